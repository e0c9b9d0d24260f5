"""Random video rows of a cache, read at their raw file offsets (search's candidates).

A search re-scores its best N candidates with exact WTI, so it needs N rows of frame tokens out of
a collection that may not fit in memory (a million videos are 12 GB of float16 frames). HDF5's own
reader would decode a whole 256-row chunk per row; the cache's shards are uncompressed row chunks
(shards.py), so row r of a chunk starting at row r0 lies at chunk offset + (r - r0) x row bytes and
one `pread` brings it straight into the destination array. A shard of another layout falls back
to h5py (slower, same values).

    rows = VideoRows(reader, ["gallery"])      # every row of the named splits, in the cache's order
    rows.read(np.array([5, 17, 3]))           # -> {"frames" [3, F, D], "frame_mask", "frame_logits", "frame_times"}

The small per-frame fields (mask, logits, times: 84 bytes a video at F = 12, 84 MB at a million)
are loaded once; only the frame tokens (12 KiB a video) are read per row.
"""
from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np

from .manifest import CacheError
from .shards import FIELDS, OPTIONAL_FIELDS, field_dtype, raw_chunks, read_shard_into

SMALL_FIELDS = ("frame_mask", "frame_logits", "frame_times")  # held in memory; frames are read per row


class _Shard:
    """One open video shard: per field, (chunk rows, {chunk index: file offset}) or None (use h5py)."""

    def __init__(self, path: Path, tails: dict, float_dtype: str):
        self.path = path
        self.fd = os.open(path, os.O_RDONLY)
        self.layout: dict[str, tuple[int, dict[int, int]] | None] = {}
        self.missing: set[str] = set()
        with h5py.File(path, "r") as f:
            self.rows = int(f.attrs.get("rows", 0))
            for name in FIELDS["video"]:
                if name not in f:
                    self.missing.add(name)
                    continue
                ds = f[name]
                probe = np.empty((1,) + tails[name], field_dtype(name, float_dtype))
                chunks = raw_chunks(ds, probe) if ds.shape[0] else None
                if chunks is None:
                    self.layout[name] = None
                else:
                    step = ds.chunks[0]
                    self.layout[name] = (step, {r0 // step: off for r0, off in chunks})

    def read(self, name: str, rows: np.ndarray, dest: np.ndarray) -> None:
        """dest[i] = row rows[i] of dataset `name`."""
        if name in self.missing:
            dest[...] = OPTIONAL_FIELDS[name]
            return
        layout = self.layout[name]
        if layout is None:
            with h5py.File(self.path, "r") as f:
                order = np.argsort(rows)
                dest[order] = f[name][np.sort(rows)]
            return
        step, offsets = layout
        flat = dest.reshape(len(dest), -1).view(np.uint8)
        row_bytes = flat.shape[1]
        for i, r in enumerate(rows.tolist()):
            view, off = memoryview(flat[i]), offsets[r // step] + (r % step) * row_bytes
            while view:
                got = os.preadv(self.fd, [view], off)
                if got <= 0:
                    raise CacheError(f"{self.path}: unexpected end of file reading {name} row {r}")
                view, off = view[got:], off + got

    def close(self) -> None:
        os.close(self.fd)


class VideoRows:
    """The video rows of `splits` of a cache (CacheReader), in the cache's order; `read(rows)` takes
    any of them without loading the others. Keeps one file descriptor a shard open."""

    def __init__(self, reader, splits: list[str]):
        m = reader.manifest
        self.root = Path(reader.root)
        self.tails = {"frames": (m.n_frames, m.width), "frame_mask": (m.n_frames,), "frame_logits": (m.n_frames,),
                      "frame_times": (m.n_frames,)}
        self.dtype = m.dtype
        self.shards: list[_Shard] = []
        starts = [0]
        try:
            for split in splits:
                for rec in (s for s in m.shards if s.kind == "video" and s.split == split):
                    path = self.root / rec.file
                    if not path.is_file():
                        raise CacheError(f"{self.root} is incomplete: shard {rec.file} is missing")
                    self.shards.append(_Shard(path, self.tails, m.dtype))
                    starts.append(starts[-1] + rec.rows)
        except OSError as e:
            self.close()
            raise CacheError(f"{self.root}: cannot open a shard ({e.strerror or e})") from None
        self.starts = np.asarray(starts, dtype=np.int64)
        self.small = {k: np.empty((len(self),) + self.tails[k], field_dtype(k, m.dtype)) for k in SMALL_FIELDS}
        for i, shard in enumerate(self.shards):
            part = {k: v[self.starts[i]:self.starts[i + 1]] for k, v in self.small.items()}
            read_shard_into(shard.path, part, 0)

    def __len__(self) -> int:
        return int(self.starts[-1])

    def read(self, rows, fields: tuple[str, ...] = FIELDS["video"]) -> dict[str, np.ndarray]:
        """rows [n] int (any order) -> {field: [n, ...]} as stored (masks as bool)."""
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) and (rows.min() < 0 or rows.max() >= len(self)):
            raise IndexError(f"video row out of range 0..{len(self) - 1}")
        out = {k: self.small[k][rows] for k in fields if k in self.small}
        big = [k for k in fields if k not in self.small]
        out.update({k: np.empty((len(rows),) + self.tails[k], field_dtype(k, self.dtype)) for k in big})
        shard = np.searchsorted(self.starts, rows, side="right") - 1
        for s in np.unique(shard).tolist():
            pick = np.nonzero(shard == s)[0]
            local = rows[pick] - self.starts[s]
            for k in big:
                part = np.empty((len(pick),) + self.tails[k], out[k].dtype)
                self.shards[s].read(k, local, part)
                out[k][pick] = part
        for k in out:
            if k.endswith("_mask"):
                out[k] = out[k].view(bool)
        return out

    def close(self) -> None:
        for s in self.shards:
            s.close()
        self.shards = []

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001  (interpreter shutdown)
            pass
