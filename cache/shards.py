"""HDF5 tensor shards: dense float16 arrays, chunked along the row axis, written atomically.

A shard is one `.h5` file holding a fixed set of same-length datasets (one row per caption or
per video). It is written under a temporary name and renamed only once complete and flushed,
so a visible shard is always a whole one. Layout per kind:

    text  : sentence [N, D] f16, words [N, L, D] f16, word_mask [N, L] u8, word_logits [N, L] f16
    video : frames [N, F, D] f16, frame_mask [N, F] u8, frame_logits [N, F] f16, frame_times [N, F] f32

frame_times (each sampled frame's decoded timestamp in seconds, -1 in padded slots) is newer than
the other datasets: a shard written before it lacks it, and reads as all -1 (OPTIONAL_FIELDS).
"""
from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np

from .atomic import atomic_write

TEXT_FIELDS = ("sentence", "words", "word_mask", "word_logits")
VIDEO_FIELDS = ("frames", "frame_mask", "frame_logits", "frame_times")
FIELDS = {"text": TEXT_FIELDS, "video": VIDEO_FIELDS}
MASK_FIELDS = ("word_mask", "frame_mask")
TIME_FIELDS = ("frame_times",)  # float32 seconds whatever the cache's float dtype; -1: no time (padded slot)
OPTIONAL_FIELDS = {"frame_times": -1.0}  # absent from older shards: read as this value
ROW_CHUNK = 256  # rows per HDF5 chunk


def shard_name(kind: str, split: str, index: int) -> str:
    return f"{kind}-{split}-{index:05d}.h5"


def field_dtype(name: str, float_dtype: str = "float16") -> np.dtype:
    if name in TIME_FIELDS:
        return np.dtype(np.float32)
    return np.dtype(np.uint8) if name in MASK_FIELDS else np.dtype(float_dtype)


def write_shard(path: Path, kind: str, arrays: dict[str, np.ndarray], float_dtype: str = "float16") -> int:
    """Write one shard atomically; returns its row count. `arrays` maps every field of `kind`."""
    path = Path(path)
    names = FIELDS[kind]
    missing = [n for n in names if n not in arrays]
    if missing:
        raise ValueError(f"{kind} shard needs fields {missing}")
    rows = {len(arrays[n]) for n in names}
    if len(rows) != 1:
        raise ValueError(f"{kind} shard fields have different row counts: {sorted(rows)}")
    n = rows.pop()

    def write(tmp: Path) -> None:
        with h5py.File(tmp, "w") as f:
            f.attrs["kind"] = kind
            f.attrs["rows"] = n
            for name in names:
                a = np.ascontiguousarray(arrays[name], dtype=field_dtype(name, float_dtype))
                chunks = (max(1, min(n, ROW_CHUNK)),) + a.shape[1:] if n else None
                f.create_dataset(name, data=a, chunks=chunks, track_times=False)  # same rows, same bytes

    atomic_write(path, write)
    return n


def _raw_chunks(ds: h5py.Dataset, dest: np.ndarray) -> list[tuple[int, int]] | None:
    """(first row, file offset) of every chunk of `ds` when its bytes on disk are exactly the
    rows of `dest` (no filters, full-width row chunks, same dtype and byte order, every chunk
    allocated); None when HDF5 must do the reading (any other layout)."""
    if not dest.flags.c_contiguous or ds.dtype != dest.dtype:  # equal dtypes: equal byte order too
        return None
    dcpl = ds.id.get_create_plist()
    if dcpl.get_layout() != h5py.h5d.CHUNKED or dcpl.get_nfilters() or ds.chunks[1:] != ds.shape[1:]:
        return None
    if not hasattr(ds.id, "chunk_iter"):
        return None
    chunks: list[tuple[int, int]] = []
    ds.id.chunk_iter(lambda info: chunks.append((info.chunk_offset[0], info.byte_offset)))
    if len(chunks) != -(-ds.shape[0] // ds.chunks[0]):  # unallocated chunks read as fill values
        return None
    return chunks


raw_chunks = _raw_chunks  # public for cache/rows.py, which reads single rows at these offsets


def read_shard_into(path: Path, out: dict[str, np.ndarray], start: int) -> int:
    """Read every dataset named in `out` into out[name][start:start + rows]; returns the shard's
    row count. The cache's own layout (uncompressed row chunks) is read with one `preadv` per
    chunk straight into the destination rows: HDF5's own path bounces each chunk through a
    temporary buffer (an extra copy of every byte). Any other layout goes through h5py."""
    path = Path(path)
    with h5py.File(path, "r") as f, open(path, "rb", buffering=0) as raw:
        rows = None
        for name, dest in out.items():
            if name not in f and name in OPTIONAL_FIELDS:  # a shard older than the field
                rows = int(f.attrs.get("rows", 0))
                dest[start:start + rows] = OPTIONAL_FIELDS[name]
                continue
            ds = f[name]
            rows = ds.shape[0]
            if not rows:
                continue
            part = dest[start:start + rows]
            chunks = _raw_chunks(ds, part)
            if chunks is None:
                ds.read_direct(dest, dest_sel=np.s_[start:start + rows])
                continue
            flat = part.reshape(-1).view(np.uint8)
            row_bytes, step = part[0].nbytes, ds.chunks[0]
            for r0, offset in chunks:
                view = memoryview(flat[r0 * row_bytes:min(r0 + step, rows) * row_bytes])
                while view:
                    got = os.preadv(raw.fileno(), [view], offset)
                    if got <= 0:
                        raise OSError(f"{path}: unexpected end of file reading {name}")
                    view, offset = view[got:], offset + got
        return int(rows or 0)
