"""Writing and reading a whole cache: shards + Parquet index + manifest.

On disk (see CACHE.md):

    manifest.json                 schema version, widths, model fingerprint, config, shards
    captions.parquet              caption_id, video_id, caption, split, shard, row, n_words
    videos.parquet                video_id, split, path, shard, row, n_frames
    shards/{text,video}-<split>-<nnnnn>.h5

Rows of a split are stored in order across its shards; `row` is the row inside `shard`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .manifest import CacheError, Manifest, ShardRecord, read_manifest, sha256_file, write_manifest
from .shards import FIELDS, field_dtype, read_shard, shard_name, write_shard

CAPTIONS_FILE = "captions.parquet"
VIDEOS_FILE = "videos.parquet"
SHARD_DIR = "shards"


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

    def __len__(self) -> int:
        return len(self.video_id)

    def index_of(self, video_ids: list[str]) -> np.ndarray:
        """Row of each given video id in this split ([N] int64); KeyError names a missing id."""
        pos = {v: i for i, v in enumerate(self.video_id)}
        try:
            return np.array([pos[v] for v in video_ids], dtype=np.int64)
        except KeyError as e:
            raise CacheError(f"caption refers to video {e.args[0]!r} that is not in the cache") from None


@dataclass
class _Pending:
    """Rows of one (kind, split) waiting to fill a shard."""

    arrays: dict[str, list[np.ndarray]] = field(default_factory=dict)
    rows: int = 0
    shard_index: int = 0


class CacheWriter:
    """Accumulates rows and writes full shards as they fill; `close()` writes index + manifest.

    The manifest is written last, so a directory without one is never mistaken for a cache.
    """

    def __init__(self, root: Path, manifest: Manifest, shard_rows: int = 4096):
        self.root = Path(root)
        self.manifest = manifest
        self.shard_rows = shard_rows
        (self.root / SHARD_DIR).mkdir(parents=True, exist_ok=True)
        self._pending: dict[tuple[str, str], _Pending] = {}
        self._captions: list[dict] = []
        self._videos: list[dict] = []

    def add_text(self, split, caption_ids, video_ids, captions, sentence, words, word_mask, word_logits):
        """Append caption rows: lists of length N and arrays [N, ...] (see TextFeatures)."""
        arrays = dict(sentence=sentence, words=words, word_mask=word_mask, word_logits=word_logits)
        extra = [
            {"caption_id": c, "video_id": v, "caption": t, "split": split, "n_words": int(m.sum())}
            for c, v, t, m in zip(caption_ids, video_ids, captions, np.asarray(word_mask))
        ]
        self._add("text", split, arrays, extra, self._captions)

    def add_video(self, split, video_ids, paths, frames, frame_mask, frame_logits):
        """Append video rows: lists of length M and arrays [M, ...] (see VideoFeatures)."""
        arrays = dict(frames=frames, frame_mask=frame_mask, frame_logits=frame_logits)
        extra = [
            {"video_id": v, "split": split, "path": str(p), "n_frames": int(m.sum())}
            for v, p, m in zip(video_ids, paths, np.asarray(frame_mask))
        ]
        self._add("video", split, arrays, extra, self._videos)

    def _add(self, kind, split, arrays, rows, table):
        pend = self._pending.setdefault((kind, split), _Pending())
        n = len(rows)
        for name in FIELDS[kind]:
            a = np.asarray(arrays[name])
            if len(a) != n:
                raise ValueError(f"{name} has {len(a)} rows, expected {n}")
            pend.arrays.setdefault(name, []).append(a)
        for i, r in enumerate(rows):
            r["shard"] = shard_name(kind, split, pend.shard_index + (pend.rows + i) // self.shard_rows)
            r["row"] = (pend.rows + i) % self.shard_rows
        table.extend(rows)
        pend.rows += n
        while pend.rows >= self.shard_rows:
            self._flush(kind, split, self.shard_rows)

    def _flush(self, kind, split, n):
        pend = self._pending[(kind, split)]
        merged = {k: np.concatenate(v) for k, v in pend.arrays.items()}
        out = {k: v[:n] for k, v in merged.items()}
        pend.arrays = {k: [v[n:]] for k, v in merged.items()}
        pend.rows -= n
        name = shard_name(kind, split, pend.shard_index)
        pend.shard_index += 1
        path = self.root / SHARD_DIR / name
        rows = write_shard(path, kind, out, self.manifest.dtype)
        self.manifest.shards.append(
            ShardRecord(file=f"{SHARD_DIR}/{name}", kind=kind, split=split, rows=rows, sha256=sha256_file(path))
        )

    def close(self) -> Manifest:
        for (kind, split), pend in list(self._pending.items()):
            if pend.rows:
                self._flush(kind, split, pend.rows)
        _write_table(self.root / CAPTIONS_FILE, self._captions, CAPTION_SCHEMA)
        _write_table(self.root / VIDEOS_FILE, self._videos, VIDEO_SCHEMA)
        splits: dict[str, dict] = {}
        for r in self._captions:
            splits.setdefault(r["split"], {"captions": 0, "videos": 0})["captions"] += 1
        for r in self._videos:
            splits.setdefault(r["split"], {"captions": 0, "videos": 0})["videos"] += 1
        self.manifest.splits = splits
        write_manifest(self.root, self.manifest)
        return self.manifest


CAPTION_SCHEMA = pa.schema(
    [("caption_id", pa.string()), ("video_id", pa.string()), ("caption", pa.string()), ("split", pa.string()),
     ("shard", pa.string()), ("row", pa.int64()), ("n_words", pa.int32())]
)
VIDEO_SCHEMA = pa.schema(
    [("video_id", pa.string()), ("split", pa.string()), ("path", pa.string()), ("shard", pa.string()),
     ("row", pa.int64()), ("n_frames", pa.int32())]
)


def _write_table(path: Path, rows: list[dict], schema: pa.Schema) -> None:
    cols = {name: [r[name] for r in rows] for name in schema.names}
    table = pa.Table.from_pydict(cols, schema=schema)
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(table, tmp)
    tmp.replace(path)


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
        parts: dict[str, list[np.ndarray]] = {}
        for rec in records:
            path = self.root / rec.file
            if not path.is_file():
                raise CacheError(f"{self.root} is incomplete: shard {rec.file} is missing")
            for k, v in read_shard(path, FIELDS[kind]).items():
                parts.setdefault(k, []).append(v)
        if not records:  # the split has rows of the other kind only: empty arrays, right shapes
            m = self.manifest
            tail = {"sentence": (m.width,), "words": (m.n_words, m.width), "word_mask": (m.n_words,),
                    "word_logits": (m.n_words,), "frames": (m.n_frames, m.width), "frame_mask": (m.n_frames,),
                    "frame_logits": (m.n_frames,)}
            parts = {k: [np.zeros((0,) + tail[k], field_dtype(k, m.dtype))] for k in FIELDS[kind]}
        arrays = {k: np.concatenate(v) for k, v in parts.items()}
        n = sum(r.rows for r in records)
        if n != index.num_rows:
            raise CacheError(f"{self.root}: {kind} split {split!r} has {n} tensor rows but {index.num_rows} index rows")
        # Index rows are in write order; shards hold the same order, so positions line up.
        for k in arrays:
            if k.endswith("_mask"):
                arrays[k] = arrays[k].astype(bool)
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


FAILURES_FILE = "failures.parquet"
FAILURE_SCHEMA = pa.schema([("video_id", pa.string()), ("path", pa.string()), ("reason", pa.string())])


def write_failures(root: Path, rows: list[tuple[str, str, str]]) -> Path:
    """Record unreadable inputs: one row (video_id, path, reason) each; written even when empty."""
    path = Path(root) / FAILURES_FILE
    _write_table(path, [dict(zip(FAILURE_SCHEMA.names, r)) for r in rows], FAILURE_SCHEMA)
    return path


def read_failures(root: Path) -> list[dict]:
    path = Path(root) / FAILURES_FILE
    return pq.read_table(path).to_pylist() if path.is_file() else []
