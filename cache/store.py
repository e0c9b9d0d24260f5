"""Writing and reading a whole cache: shards + Parquet index + manifest.

On disk (see docs/cache.md):

    manifest.json                 schema version, widths, model fingerprint, config, shards
    captions.parquet              caption_id, video_id, caption, split, shard, row, n_words
    videos.parquet                video_id, split, path, shard, row, n_frames
    (video shards also hold frame_times [M, F] float32: decoded timestamps, -1 in padded slots)
    shards/{text,video}-<split>-<nnnnn>.h5

Rows of a split are stored in order across its shards; `row` is the row inside `shard`.
Writing is writer.py (kill-safe, resumable); this module reads.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .layout import (  # noqa: F401  (re-exported: the cache's public names live here)
    CAPTION_SCHEMA, CAPTIONS_FILE, FAILURE_SCHEMA, FAILURES_FILE, SHARD_DIR, VIDEO_SCHEMA, VIDEOS_FILE,
    read_failures, write_failures,
)
from .manifest import CacheError, read_manifest
from .shards import FIELDS, field_dtype, read_shard_into
from .writer import CacheWriter  # noqa: F401


@dataclass
class TextFeatures:
    """Cached caption features of one split; arrays as stored (float16 / bool)."""

    caption_id: list[str]
    video_id: list[str]
    caption: list[str]
    sentence: np.ndarray  # [N, D] EOT sentence feature
    words: np.ndarray  # [N, L, D] word tokens, padded
    word_mask: np.ndarray  # [N, L] bool
    word_logits: np.ndarray  # [N, L] word-weight logits of the similarity head

    def __len__(self) -> int:
        return len(self.caption_id)


@dataclass
class VideoFeatures:
    """Cached video features of one split; arrays as stored (float16 / bool)."""

    video_id: list[str]
    frames: np.ndarray  # [M, F, D] frame tokens after the temporal transformer, padded
    frame_mask: np.ndarray  # [M, F] bool
    frame_logits: np.ndarray  # [M, F] frame-weight logits
    frame_times: np.ndarray | None = None  # [M, F] float32 decoded timestamps (s); -1: padded slot or unknown

    def __len__(self) -> int:
        return len(self.video_id)

    def index_of(self, video_ids: list[str]) -> np.ndarray:
        """Row of each given video id in this split ([N] int64); KeyError names a missing id."""
        pos = {v: i for i, v in enumerate(self.video_id)}
        try:
            return np.array([pos[v] for v in video_ids], dtype=np.int64)
        except KeyError as e:
            raise CacheError(f"caption refers to video {e.args[0]!r} that is not in the cache") from None


class CacheReader:
    """Read a cache written by CacheWriter. Opening checks the manifest (schema version)."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.manifest = read_manifest(self.root)
        for name in (CAPTIONS_FILE, VIDEOS_FILE):
            if not (self.root / name).is_file():
                raise CacheError(f"{self.root} is incomplete: {name} is missing")

    @property
    def splits(self) -> list[str]:
        return sorted(self.manifest.splits)

    def index(self, kind: str, split: str | None = None) -> pa.Table:
        """The Parquet index of captions ("text") or videos ("video"), optionally one split."""
        table = pq.read_table(self.root / (CAPTIONS_FILE if kind == "text" else VIDEOS_FILE))
        if split is not None:
            table = table.filter(pc.equal(table["split"], split))
        return table

    def _load(self, kind: str, split: str) -> tuple[pa.Table, dict[str, np.ndarray]]:
        if split not in self.manifest.splits:
            raise CacheError(f"{self.root} has no split {split!r}; it has {self.splits}")
        index = self.index(kind, split)
        records = [s for s in self.manifest.shards if s.kind == kind and s.split == split]
        n = sum(r.rows for r in records)
        if n != index.num_rows:
            raise CacheError(f"{self.root}: {kind} split {split!r} has {n} tensor rows but {index.num_rows} index rows")
        m = self.manifest
        tail = {"sentence": (m.width,), "words": (m.n_words, m.width), "word_mask": (m.n_words,),
                "word_logits": (m.n_words,), "frames": (m.n_frames, m.width), "frame_mask": (m.n_frames,),
                "frame_logits": (m.n_frames,), "frame_times": (m.n_frames,)}
        # One preallocated array per field; each shard is read straight into its rows.
        arrays = {k: np.empty((n,) + tail[k], field_dtype(k, m.dtype)) for k in FIELDS[kind]}
        start = 0
        for rec in records:
            path = self.root / rec.file
            if not path.is_file():
                raise CacheError(f"{self.root} is incomplete: shard {rec.file} is missing")
            start += read_shard_into(path, arrays, start)
        # Index rows are in write order; shards hold the same order, so positions line up.
        for k in arrays:
            if k.endswith("_mask"):
                arrays[k] = arrays[k].view(bool)  # stored as 0/1 bytes: a view, not a copy
        return index, arrays

    def text(self, split: str) -> TextFeatures:
        index, a = self._load("text", split)
        return TextFeatures(
            caption_id=index["caption_id"].to_pylist(), video_id=index["video_id"].to_pylist(),
            caption=index["caption"].to_pylist(), **a,
        )

    def video(self, split: str) -> VideoFeatures:
        index, a = self._load("video", split)
        return VideoFeatures(video_id=index["video_id"].to_pylist(), **a)

