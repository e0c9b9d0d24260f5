"""Growing a folder collection: re-running `extract --dataset folder` after adding videos.

The cache records every file it was made from (`folder-inputs.parquet`: id, path, size, mtime).
A re-run of the same command on the complete cache compares the folder with that record:

* a file of the cache that is gone, or whose size or mtime changed: refused, naming it (its
  features would no longer describe the file; restore it, or rebuild with --overwrite);
* new files: only they are decoded and encoded (with the cache's own stage1.pt), into a staging
  part (parts/rank-999/, a resumable cache of its own); then their shards move into shards/ after
  the existing ones (which are kept as they are), the index tables and failures are extended, and
  the manifest is written last (the commit). A search index the cache had is rebuilt.
"""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from diffret.cache.layout import (
    FOLDER_INPUTS_FILE, SHARD_DIR, STAGE1_FILE, VIDEO_SCHEMA, VIDEOS_FILE, name_list, read_failures, write_failures,
    write_table,
)
from diffret.cache.manifest import ShardRecord, file_checksums, read_manifest, write_manifest
from diffret.cache.writer import CacheWriter

from .annotations.folder import GALLERY
from .data import threads_beside_workers
from .dump import OutputError, dump_videos
from .merge import part_dir

INPUT_SCHEMA = pa.schema([("video_id", pa.string()), ("path", pa.string()), ("size", pa.int64()),
                          ("mtime_ns", pa.int64())])
STAGING_RANK = 999  # parts/rank-999: the new videos' staging cache


def _stat(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return int(st.st_size), int(st.st_mtime_ns)


def write_folder_inputs(root: Path, videos: dict[str, Path], recorded: dict | None = None) -> None:
    """Record (size, mtime) of every video of `videos` (id -> file), keeping `recorded` ones as they were."""
    rows = []
    for vid, path in videos.items():
        st = (recorded or {}).get(vid) or _stat(path) or (-1, -1)
        rows.append({"video_id": vid, "path": str(path), "size": st[0], "mtime_ns": st[1]})
    write_table(Path(root) / FOLDER_INPUTS_FILE, rows, INPUT_SCHEMA)


def read_folder_inputs(root: Path) -> dict[str, tuple[int, int]]:
    path = Path(root) / FOLDER_INPUTS_FILE
    if not path.is_file():
        return {}
    return {r["video_id"]: (r["size"], r["mtime_ns"]) for r in pq.read_table(path).to_pylist()}


def folder_changes(out: Path, videos: dict[str, Path]) -> list[str]:
    """The ids of `videos` (the folder now) that the cache in `out` lacks; OutputError (one line,
    naming them) when a file the cache was made from is gone or changed."""
    out = Path(out)
    cached = pq.read_table(out / VIDEOS_FILE, columns=["video_id"])["video_id"].to_pylist()
    known = set(cached) | {f["video_id"] for f in read_failures(out)}
    recorded = read_folder_inputs(out)
    removed = sorted(v for v in known if v not in videos)
    if removed:
        raise OutputError(f"{len(removed)} video(s) of the cache {out} are gone from the folder: {name_list(removed)}; "
                          f"restore them, or pass --overwrite to rebuild the cache from the folder as it is")
    changed = sorted(v for v in known if v in recorded and _stat(videos[v]) != tuple(recorded[v]))
    if changed:
        raise OutputError(f"{len(changed)} video(s) changed since they were extracted into {out}: "
                          f"{name_list(changed)}; restore them, or pass --overwrite to extract the folder anew")
    return [v for v in videos if v not in known]


def _next_index(m, split: str) -> int:
    used = [int(x.group(1)) for s in m.shards if s.kind == "video" and s.split == split
            for x in [re.search(r"-(\d{5})(?:-r\d{3})?\.h5$", s.file)] if x]
    return max(used) + 1 if used else 0


def grow_folder(cfg, out: Path, ann, device, progress=None, log=print) -> dict | None:
    """Extract the videos of the folder `ann` that the complete cache `out` lacks (see the module
    docstring) -> the run's summary, or None when there is nothing new."""
    from .checkpoint import load_stage1
    from .config import ExtractConfig

    import time

    t0 = time.time()
    out = Path(out)
    new = folder_changes(out, ann.videos)
    if not new:
        return None
    m = read_manifest(out)
    log(f"{out}: {len(new)} new video(s) in {cfg.data_root}; extracting only those (the cache's "
        f"{sum(s.rows for s in m.shards if s.kind == 'video')} videos are kept)")
    dump_cfg = ExtractConfig.from_dict({**m.extract_config, "device": cfg.device, "workers": cfg.workers})
    model, spec, fp, _ = load_stage1(out / STAGE1_FILE, dump_cfg)
    if fp != m.fingerprint:
        raise OutputError(f"{out}/{STAGE1_FILE} is not the model the cache was dumped with; pass --overwrite")
    model = model.to(device).eval()
    staging = part_dir(out, STAGING_RANK)
    staging.mkdir(parents=True, exist_ok=True)
    writer = CacheWriter(staging, read_manifest(out), shard_rows=cfg.shard_rows, resume=True, log=log)
    with threads_beside_workers(cfg.workers, device):
        dump_videos(model, writer, GALLERY, new, [ann.videos[v] for v in new], spec, device,
                    batch_size=max(1, min(cfg.batch_size, 64)), workers=cfg.workers, amp=cfg.amp, progress=progress,
                    timeout=cfg.decode_timeout)
    part = writer.close()
    # the commit: shards after the existing ones, the tables extended, the manifest written last
    nxt = _next_index(m, GALLERY)
    renamed = {}
    for rec in part.shards:
        name = f"video-{GALLERY}-{nxt:05d}.h5"
        nxt += 1
        os.replace(staging / rec.file, out / SHARD_DIR / name)
        renamed[Path(rec.file).name] = name
        m.shards.append(ShardRecord(file=f"{SHARD_DIR}/{name}", kind="video", split=GALLERY, rows=rec.rows,
                                    sha256=rec.sha256))
    rows = pq.read_table(out / VIDEOS_FILE).select(VIDEO_SCHEMA.names).to_pylist()
    added = [{**r, "shard": renamed[r["shard"]]} for r in pq.read_table(staging / VIDEOS_FILE).to_pylist()]
    write_table(out / VIDEOS_FILE, rows + added, VIDEO_SCHEMA)
    fails = {f["video_id"]: (f["video_id"], f["path"], f["reason"]) for f in read_failures(out) + read_failures(staging)}
    write_failures(out, sorted(fails.values()))
    write_folder_inputs(out, ann.videos, read_folder_inputs(out))
    old_index = dict(m.index)
    m.index = {}  # the index no longer covers every video: rebuilt below
    m.splits = {**m.splits, GALLERY: {"captions": 0, "videos": len(rows) + len(added)}}
    m.files = file_checksums(out)
    write_manifest(out, m)
    shutil.rmtree(staging, ignore_errors=True)
    if not any(staging.parent.iterdir()):
        staging.parent.rmdir()
    if old_index:
        from diffret.cache.index import build_index

        build_index(out, old_index.get("kind", "auto"), progress=progress, log=log)
    failed = len([v for v in new if v in fails])
    return {"cache": str(out), "grown": len(new) - failed, "splits": m.splits, "failed": len(fails),
            "failures_file": str(out / "failures.parquet"), "seconds": round(time.time() - t0, 1), "device": str(device)}
