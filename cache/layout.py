"""File names and Parquet schemas of a cache directory, and Parquet writes (atomic: atomic.py).

    manifest.json                         (manifest.py)
    captions.parquet, videos.parquet      the row index: CAPTION_SCHEMA, VIDEO_SCHEMA
    failures.parquet                      videos that could not be read: FAILURE_SCHEMA
    shards/{text,video}-<split>-<nnnnn>.h5
    progress/                             only while an extraction is unfinished (journal.py)
"""
from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from .atomic import atomic_write

CAPTIONS_FILE = "captions.parquet"
VIDEOS_FILE = "videos.parquet"
FAILURES_FILE = "failures.parquet"
SHARD_DIR = "shards"

CAPTION_SCHEMA = pa.schema(
    [("caption_id", pa.string()), ("video_id", pa.string()), ("caption", pa.string()), ("split", pa.string()),
     ("shard", pa.string()), ("row", pa.int64()), ("n_words", pa.int32())]
)
VIDEO_SCHEMA = pa.schema(
    [("video_id", pa.string()), ("split", pa.string()), ("path", pa.string()), ("shard", pa.string()),
     ("row", pa.int64()), ("n_frames", pa.int32())]
)
FAILURE_SCHEMA = pa.schema([("video_id", pa.string()), ("path", pa.string()), ("reason", pa.string())])


def write_table(path: Path, rows: list[dict], schema: pa.Schema) -> None:
    """Write `rows` (dicts with the schema's columns) as Parquet, atomically."""
    path = Path(path)
    cols = {name: [r[name] for r in rows] for name in schema.names}
    table = pa.Table.from_pydict(cols, schema=schema)
    atomic_write(path, lambda tmp: pq.write_table(table, tmp))


def write_failures(root: Path, rows: list[tuple[str, str, str]]) -> Path:
    """Record unreadable inputs: one row (video_id, path, reason) each; written even when empty."""
    path = Path(root) / FAILURES_FILE
    write_table(path, [dict(zip(FAILURE_SCHEMA.names, r)) for r in rows], FAILURE_SCHEMA)
    return path


def read_failures(root: Path) -> list[dict]:
    path = Path(root) / FAILURES_FILE
    return pq.read_table(path).to_pylist() if path.is_file() else []
