"""`diffret cache verify`: prove that a cache is whole and self-consistent, or name the first problem.

Checks, in order: the manifest (schema version, fields); the Parquet index files and their
columns; every shard listed in the manifest (present, sha256 as recorded at write time, the
datasets of its kind with the manifest's shapes and dtypes (frame_times: float32 [rows, F]; absent
from shards older than it), finite values, masks that are 0/1
with the valid slots first and at least one of them); row counts (shards vs index vs
manifest.splits); index <-> tensor consistency (every index row points at an existing row of a
shard of its kind and split, in write order, n_words / n_frames equal to the masks, ids unique,
every caption's video in the same split); failures.parquet; last, the sha256 of every other file
the manifest records (`files`: the index files, failures.parquet, stage1.pt), each file of those
names in the folder being recorded; then the search index when the manifest lists one (cache/index.py:
its file's sha256, its rows, not stale). Stray files are reported as notes.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from .journal import PROGRESS_DIR
from .layout import CAPTION_SCHEMA, CAPTIONS_FILE, FAILURE_SCHEMA, FAILURES_FILE, SHARD_DIR, VIDEO_SCHEMA, VIDEOS_FILE
from .manifest import CHECKSUMMED_FILES, MANIFEST_NAME, CacheError, Manifest, read_manifest, sha256_file
from .shards import FIELDS, MASK_FIELDS, OPTIONAL_FIELDS, field_dtype

INDEX = {"text": (CAPTIONS_FILE, CAPTION_SCHEMA, "n_words", "word_mask"),
         "video": (VIDEOS_FILE, VIDEO_SCHEMA, "n_frames", "frame_mask")}


def _tail(m: Manifest, name: str) -> tuple[int, ...]:
    """Shape of one row of dataset `name` according to the manifest."""
    return {"sentence": (m.width,), "words": (m.n_words, m.width), "word_mask": (m.n_words,),
            "word_logits": (m.n_words,), "frames": (m.n_frames, m.width), "frame_mask": (m.n_frames,),
            "frame_logits": (m.n_frames,), "frame_times": (m.n_frames,)}[name]


def _read_index(root: Path, name: str, schema) -> list[dict]:
    path = root / name
    if not path.is_file():
        raise CacheError(f"{root}: {name} is missing")
    try:
        table = pq.read_table(path)
    except Exception as e:  # noqa: BLE001  (pyarrow raises several kinds on a damaged file)
        raise CacheError(f"{root}: {name} is not readable Parquet ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    missing = [c for c in schema.names if c not in table.column_names]
    if missing:
        raise CacheError(f"{root}: {name} lacks the column(s) {', '.join(missing)}")
    return table.select(schema.names).to_pylist()


def _check_shard(root: Path, m: Manifest, rec) -> dict[str, np.ndarray]:
    """Check one shard; returns its mask dataset's valid-slot counts {mask name: [rows] int}."""
    import h5py

    path = root / rec.file
    where = f"shard {rec.file}"
    if rec.kind not in FIELDS:
        raise CacheError(f"{root}: the manifest lists {where} of unknown kind {rec.kind!r}")
    if not path.is_file():
        raise CacheError(f"{root}: {where} is missing")
    if sha256_file(path) != rec.sha256:
        raise CacheError(f"{root}: {where} is corrupted: its sha256 differs from the one recorded when it was written")
    counts = {}
    try:
        with h5py.File(path, "r") as f:
            for name in FIELDS[rec.kind]:
                if name not in f and name in OPTIONAL_FIELDS:  # a shard written before the field existed
                    continue
                if name not in f:
                    raise CacheError(f"{root}: {where} has no dataset {name!r}")
                ds = f[name]
                want_shape, want_dtype = (rec.rows,) + _tail(m, name), field_dtype(name, m.dtype)
                if tuple(ds.shape) != want_shape:
                    raise CacheError(f"{root}: {where}: {name} has shape {tuple(ds.shape)}, the manifest says {want_shape}")
                if ds.dtype != want_dtype:
                    raise CacheError(f"{root}: {where}: {name} is {ds.dtype}, the manifest says {want_dtype}")
                a = ds[...]
                if name in MASK_FIELDS:
                    if a.size and a.max() > 1:
                        raise CacheError(f"{root}: {where}: {name} holds values other than 0 and 1")
                    n = a.sum(axis=1).astype(np.int64)
                    if rows := np.nonzero(n == 0)[0].tolist():
                        raise CacheError(f"{root}: {where}: row {rows[0]} of {name} has no valid slot")
                    prefix = np.arange(a.shape[1])[None, :] < n[:, None]
                    if rows := np.nonzero((a.astype(bool) != prefix).any(axis=1))[0].tolist():
                        raise CacheError(f"{root}: {where}: row {rows[0]} of {name} has padding before a valid slot")
                    counts[name] = n
                elif not np.isfinite(a).all():
                    row = int(np.nonzero(~np.isfinite(a).reshape(len(a), -1).all(axis=1))[0][0])
                    raise CacheError(f"{root}: {where}: {name} holds NaN or inf (row {row})")
    except OSError as e:
        raise CacheError(f"{root}: {where} is not readable HDF5 ({str(e).splitlines()[0]})") from None
    return counts


def _check_files(root: Path, m: Manifest) -> None:
    """Every file `m.files` records is there with its sha256; every checksummed file present is recorded."""
    for name in CHECKSUMMED_FILES:
        if (root / name).is_file() and name not in m.files:
            raise CacheError(f"{root}: the manifest records no sha256 of {name}, so it cannot be checked; "
                             f"re-run `diffret extract` to rebuild the cache")
    for name, digest in m.files.items():
        path = root / name
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise CacheError(f"{root}: the manifest lists the file {name!r}, which is outside the cache")
        if not path.is_file():
            raise CacheError(f"{root}: {name} is missing")
        if sha256_file(path) != digest:
            raise CacheError(f"{root}: {name} is corrupted: its sha256 differs from the one recorded when it was written")


def verify_cache(root: Path, progress=None) -> dict:
    """Check everything listed in the module docstring; raise CacheError naming the first problem.

    Returns a summary: {"shards", "bytes", "splits": {split: {"captions", "videos"}}, "failures", "notes"}.
    """
    root = Path(root)
    m = read_manifest(root)
    if m.width < 1 or m.n_words < 1 or m.n_frames < 1:
        raise CacheError(f"{root}: the manifest has an invalid width or slot count ({m.width}, {m.n_words}, {m.n_frames})")
    index = {kind: _read_index(root, name, schema) for kind, (name, schema, _, _) in INDEX.items()}
    files = [r.file for r in m.shards]
    if dup := [f for f, c in Counter(files).items() if c > 1]:
        raise CacheError(f"{root}: the manifest lists shard {dup[0]} twice")

    task = progress.add_task("verify shards", total=len(m.shards)) if progress else None
    counts: dict[str, np.ndarray] = {}  # shard file name -> valid slots per row
    for rec in m.shards:
        counts[Path(rec.file).name] = _check_shard(root, m, rec)[INDEX[rec.kind][3]]
        if progress:
            progress.update(task, advance=1)
    if progress:
        progress.remove_task(task)

    splits: dict[str, dict] = {}
    for kind, (name, _, n_col, mask) in INDEX.items():
        rows = index[kind]
        for split in dict.fromkeys(r["split"] for r in rows) | dict.fromkeys(r.split for r in m.shards if r.kind == kind):
            records = [r for r in m.shards if r.kind == kind and r.split == split]
            expected = [(Path(r.file).name, i) for r in records for i in range(r.rows)]
            got = [(r["shard"], r["row"]) for r in rows if r["split"] == split]
            if len(got) != len(expected):
                raise CacheError(f"{root}: {kind} split {split!r} has {len(expected)} tensor rows in its shards but "
                                 f"{len(got)} rows in {name}")
            for pos, (g, e) in enumerate(zip(got, expected)):
                if g != e:
                    raise CacheError(f"{root}: {name}, row {pos} of split {split!r}, points at {g[0]} row {g[1]}, "
                                     f"but the shards hold {e[0]} row {e[1]} there")
            split_rows = [r for r in rows if r["split"] == split]
            for r in split_rows:
                if r[n_col] != int(counts[r["shard"]][r["row"]]):
                    raise CacheError(f"{root}: {name}: {n_col} of {r.get('caption_id', r['video_id'])!r} is {r[n_col]}, "
                                     f"but its {mask} in {r['shard']} has {int(counts[r['shard']][r['row']])} valid slots")
            splits.setdefault(split, {"captions": 0, "videos": 0})["captions" if kind == "text" else "videos"] = len(got)

    for split in splits:
        ids = [r["video_id"] for r in index["video"] if r["split"] == split]
        if dup := [v for v, c in Counter(ids).items() if c > 1]:
            raise CacheError(f"{root}: {VIDEOS_FILE}: video {dup[0]!r} appears twice in split {split!r}")
        known = set(ids)
        caps = [r for r in index["text"] if r["split"] == split]
        if known:  # a split of captions only (a query bank) has no videos to point at
            if bad := [r for r in caps if r["video_id"] not in known]:
                raise CacheError(f"{root}: {CAPTIONS_FILE}: caption {bad[0]['caption_id']!r} refers to video "
                                 f"{bad[0]['video_id']!r}, which split {split!r} does not have")
    if dup := [c for c, n in Counter(r["caption_id"] for r in index["text"]).items() if n > 1]:
        raise CacheError(f"{root}: {CAPTIONS_FILE}: caption id {dup[0]!r} appears twice")
    if m.splits and {s: dict(c) for s, c in m.splits.items()} != splits:
        raise CacheError(f"{root}: the manifest counts {m.splits} but the index holds {splits}")
    failures = _read_index(root, FAILURES_FILE, FAILURE_SCHEMA)
    _check_files(root, m)  # after the checks above, which name what is wrong more precisely
    from .index import verify_index  # the search index (index/): listed, whole, not stale

    index_note = verify_index(root, m)

    notes = [index_note] if index_note else []
    listed = {Path(f).name for f in files}
    stray = sorted(p.name for p in (root / SHARD_DIR).iterdir() if p.name not in listed) if (root / SHARD_DIR).is_dir() else []
    if stray:
        notes.append(f"{len(stray)} file(s) in {SHARD_DIR}/ not listed in {MANIFEST_NAME} (ignored), e.g. {stray[0]}")
    if (root / PROGRESS_DIR).exists():
        notes.append(f"a leftover {PROGRESS_DIR}/ folder of the run that wrote this cache (ignored; safe to delete)")
    size = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    return {"shards": len(m.shards), "bytes": size, "splits": splits, "failures": len(failures), "notes": notes}
