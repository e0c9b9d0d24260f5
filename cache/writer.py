"""CacheWriter: rows in, shards + Parquet index + manifest out; kill-safe and resumable.

Rows of each (kind, split) are cut into shards of `shard_rows` rows (or fewer, where the caller
ends a shard early with `end_shard`). Each shard is written under a temporary name, renamed,
and then recorded in the progress journal (journal.py). With `resume=True` a writer picks up
the journal of an interrupted run: finished shards are kept (after checking their checksums)
and numbering continues after them, so feeding it the remaining rows gives the same cache as
an uninterrupted run. `close()` writes the index, `failures.parquet` and, last, the manifest
(with the sha256 of every shard and of every other file it trusts: manifest.file_checksums).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .atomic import is_temp_name
from .journal import Journal, fault_point
from .layout import CAPTION_SCHEMA, CAPTIONS_FILE, SHARD_DIR, VIDEO_SCHEMA, VIDEOS_FILE, write_failures, write_table
from .manifest import CacheError, Manifest, ShardRecord, file_checksums, sha256_file, write_manifest
from .shards import FIELDS, MASK_FIELDS, field_dtype, shard_name, write_shard


@dataclass
class _Pending:
    """Rows of one (kind, split) waiting to fill a shard."""

    arrays: dict[str, list[np.ndarray]] = field(default_factory=dict)
    index_rows: list[dict] = field(default_factory=list)


def _io_error(what: str, e: OSError) -> CacheError:
    reason = e.strerror or str(e) or type(e).__name__
    return CacheError(f"cannot write {what}: {reason}; finished shards are kept, fix the disk and re-run the "
                      f"same command to resume")


class CacheWriter:
    """Accumulates rows and writes full shards as they fill; `close()` writes index + manifest.

    The manifest is written last, so a directory without one is never mistaken for a cache.
    """

    def __init__(self, root: Path, manifest: Manifest, shard_rows: int = 4096, resume: bool = False, log=None):
        if shard_rows < 1:
            raise ValueError(f"shard_rows must be >= 1, got {shard_rows}")
        self.root = Path(root)
        self.manifest = manifest
        self.shard_rows = shard_rows
        self.log = log or (lambda msg: None)
        self.journal = Journal(self.root)
        self._pending: dict[tuple[str, str], _Pending] = {}
        self._done: dict[tuple[str, str], list[dict]] = {}  # journal entries, in shard order
        self._pending_failures: dict[str | None, list[list[str]]] = {}
        try:
            (self.root / SHARD_DIR).mkdir(parents=True, exist_ok=True)
            for d in (self.root, self.root / SHARD_DIR):  # temporaries of a killed run
                for p in d.iterdir():
                    if p.is_file() and is_temp_name(p.name):
                        p.unlink()
        except OSError as e:
            raise _io_error(f"to {self.root}", e) from None
        if resume:
            self._resume()
        else:
            for e in self.journal.entries():
                self.journal.forget(e)

    # ------------------------------------------------------------------ resume

    def _resume(self) -> None:
        entries = self.journal.entries()
        fp = self.manifest.fingerprint
        foreign = [e for e in entries if e.get("fingerprint") != fp or e.get("shard_rows") != self.shard_rows]
        if foreign:
            self.log(f"discarding the {len(entries)} shards of the interrupted run: they were written by another "
                     f"stage-1 model or with another shard size")
            self._discard(entries)
            return
        kept, dropped, broken = 0, 0, set()
        for e in entries:
            key = (e["kind"], e["split"])
            done = self._done.setdefault(key, [])
            ok = key not in broken and int(e["index"]) == len(done)
            if ok and e.get("file"):
                path = self.root / e["file"]
                ok = path.is_file() and sha256_file(path) == e.get("sha256")
            if ok:
                done.append(e)
                kept += 1
            else:  # a gap or a damaged shard: it and everything after it in this (kind, split) is redone
                broken.add(key)
                self._discard([e])
                dropped += 1
        if kept or dropped:
            self.log(f"resuming: {kept} finished shards kept" + (f", {dropped} to redo (missing or damaged)" if dropped else ""))

    def _discard(self, entries: list[dict]) -> None:
        for e in entries:
            if e.get("file"):
                (self.root / e["file"]).unlink(missing_ok=True)
            self.journal.forget(e)

    def completed(self, kind: str, split: str) -> int:
        """How many shards of (kind, split) are finished (including earlier runs when resuming)."""
        return len(self._done.get((kind, split), []))

    def window_ids(self, kind: str, split: str, index: int) -> list[str]:
        """Ids of the inputs that finished shard `index` of (kind, split) covered: its rows' ids
        and, for videos, those recorded as failures with it."""
        e = self._done[(kind, split)][index]
        key = "caption_id" if kind == "text" else "video_id"
        return [r[key] for r in e["index_rows"]] + [f[0] for f in e.get("failures", [])]

    def rewind(self, kind: str, split: str, index: int) -> None:
        """Forget the finished shards `index`, `index + 1`, ... of (kind, split): they are redone."""
        done = self._done.get((kind, split), [])
        self._discard(done[index:])
        del done[index:]

    def done_ids(self, kind: str, split: str) -> list[str]:
        """Ids (caption_id / video_id) already in finished shards of (kind, split), in order."""
        key = "caption_id" if kind == "text" else "video_id"
        return [r[key] for e in self._done.get((kind, split), []) for r in e["index_rows"]]

    @property
    def failures(self) -> dict[str, tuple[str, str]]:
        """video_id -> (path, reason) of every failure recorded so far (journaled or pending)."""
        out: dict[str, tuple[str, str]] = {}
        for entries in self._done.values():
            for e in entries:
                for v, p, r in e.get("failures", []):
                    out.setdefault(v, (p, r))
        for rows in self._pending_failures.values():
            for v, p, r in rows:
                out.setdefault(v, (p, r))
        return out

    # ------------------------------------------------------------------ adding rows

    def add_text(self, split, caption_ids, video_ids, captions, sentence, words, word_mask, word_logits):
        """Append caption rows: lists of length N and arrays [N, ...] (see store.TextFeatures)."""
        arrays = dict(sentence=sentence, words=words, word_mask=word_mask, word_logits=word_logits)
        rows = [
            {"caption_id": str(c), "video_id": str(v), "caption": str(t), "split": split, "n_words": int(m.sum())}
            for c, v, t, m in zip(caption_ids, video_ids, captions, np.asarray(word_mask))
        ]
        self._add("text", split, arrays, rows)

    def add_video(self, split, video_ids, paths, frames, frame_mask, frame_logits, frame_times=None):
        """Append video rows: lists of length M and arrays [M, ...] (see store.VideoFeatures).
        `frame_times` [M, F]: each frame's decoded timestamp (seconds), -1 in padded slots; None: all -1."""
        if frame_times is None:
            frame_times = np.full(np.shape(frame_mask), -1.0, np.float32)
        arrays = dict(frames=frames, frame_mask=frame_mask, frame_logits=frame_logits, frame_times=frame_times)
        rows = [
            {"video_id": str(v), "split": split, "path": str(p), "n_frames": int(m.sum())}
            for v, p, m in zip(video_ids, paths, np.asarray(frame_mask))
        ]
        self._add("video", split, arrays, rows)

    def add_failures(self, rows, split: str | None = None) -> None:
        """Record unreadable videos as (video_id, path, reason). With `split`, they are journaled
        with the next video shard of that split (so a resumed run knows them); without, they are
        only written at `close()`."""
        self._pending_failures.setdefault(split, []).extend([str(v), str(p), str(r)] for v, p, r in rows)

    def _add(self, kind, split, arrays, rows):
        pend = self._pending.setdefault((kind, split), _Pending())
        n = len(rows)
        checked = {}
        for name in FIELDS[kind]:
            a = np.asarray(arrays[name])
            if len(a) != n:
                raise ValueError(f"{name} has {len(a)} rows, expected {n}")
            if name not in MASK_FIELDS:  # as stored: a float32 beyond float16's range becomes inf there
                with np.errstate(over="ignore"):
                    stored = a.astype(field_dtype(name, self.manifest.dtype), copy=False)
                bad = ~np.isfinite(stored).reshape(n, -1).all(1)
                if bad.any():
                    row = rows[int(np.argmax(bad))]
                    key = "caption_id" if kind == "text" else "video_id"
                    raise CacheError(f"refusing to write non-finite features: {name} of {key} {row[key]!r} ({split} "
                                     f"split; {int(bad.sum())} of {n} rows) holds NaN or inf, or a value beyond "
                                     f"{self.manifest.dtype}")
            checked[name] = a
        for name, a in checked.items():  # nothing is appended unless every field is fine
            pend.arrays.setdefault(name, []).append(a)
        pend.index_rows.extend(rows)
        while len(pend.index_rows) > self.shard_rows:  # a full shard waits for end_shard, close or more rows
            self._flush(kind, split, self.shard_rows)

    def end_shard(self, kind: str, split: str) -> None:
        """Finish the current shard of (kind, split) now, however few rows it has (even none:
        then no file is written, but the shard counts as finished for `completed`)."""
        pend = self._pending.get((kind, split))
        self._flush(kind, split, len(pend.index_rows) if pend else 0)

    def _flush(self, kind, split, n):
        pend = self._pending.setdefault((kind, split), _Pending())
        done = self._done.setdefault((kind, split), [])
        name = shard_name(kind, split, len(done))
        rows, pend.index_rows = pend.index_rows[:n], pend.index_rows[n:]
        entry = {"kind": kind, "split": split, "index": len(done), "file": None, "rows": n, "sha256": "",
                 "fingerprint": self.manifest.fingerprint, "shard_rows": self.shard_rows, "index_rows": rows,
                 "failures": self._pending_failures.pop(split, []) if kind == "video" else []}
        if n:
            merged = {k: np.concatenate(v) for k, v in pend.arrays.items()}
            pend.arrays = {k: [v[n:]] for k, v in merged.items()}
            path = self.root / SHARD_DIR / name
            try:
                write_shard(path, kind, {k: v[:n] for k, v in merged.items()}, self.manifest.dtype)
                entry.update(file=f"{SHARD_DIR}/{name}", sha256=sha256_file(path))
            except OSError as e:
                raise _io_error(f"shard {SHARD_DIR}/{name}", e) from None
        fault_point(f"shard:{name}")
        try:
            self.journal.record(entry)
        except OSError as e:
            raise _io_error(f"the progress journal in {self.root}", e) from None
        fault_point(f"journal:{name}")
        done.append(entry)

    # ------------------------------------------------------------------ finishing

    def close(self) -> Manifest:
        """Flush what is pending, write the index, failures.parquet and the manifest (last)."""
        for (kind, split), pend in list(self._pending.items()):
            if pend.index_rows:
                self._flush(kind, split, len(pend.index_rows))
        tables: dict[str, list[dict]] = {"text": [], "video": []}
        shards: list[ShardRecord] = []
        for (kind, split), entries in sorted(self._done.items()):
            for e in entries:
                if not e["file"]:  # a window whose every item failed: no shard, no index rows
                    continue
                shards.append(ShardRecord(file=e["file"], kind=kind, split=split, rows=e["rows"], sha256=e["sha256"]))
                name = Path(e["file"]).name
                tables[kind].extend({**r, "shard": name, "row": i} for i, r in enumerate(e["index_rows"]))
        in_cache = {r["video_id"] for r in tables["video"]}
        failures = sorted((v, p, r) for v, (p, r) in self.failures.items() if v not in in_cache)
        splits: dict[str, dict] = {}
        for kind, key in (("text", "captions"), ("video", "videos")):
            for r in tables[kind]:
                splits.setdefault(r["split"], {"captions": 0, "videos": 0})[key] += 1
        self.manifest.splits = dict(sorted(splits.items()))
        self.manifest.shards = shards
        try:
            write_table(self.root / CAPTIONS_FILE, tables["text"], CAPTION_SCHEMA)
            write_table(self.root / VIDEOS_FILE, tables["video"], VIDEO_SCHEMA)
            write_failures(self.root, failures)
            fault_point("close")
            self.manifest.files = file_checksums(self.root)  # the index files above, stage1.pt if present
            write_manifest(self.root, self.manifest)
        except OSError as e:
            raise _io_error(f"the index or manifest of {self.root}", e) from None
        self.journal.clear()
        return self.manifest

