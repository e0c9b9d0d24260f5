"""Merging the per-process parts of a cache written under torchrun.

Each process r writes a complete cache of its slice of every split into OUT/parts/rank-<r>/
(its own shards, index, manifest; resumable like any cache). Rank 0 then merges them: shards move
to OUT/shards/ with the rank in their name (`text-train-00000-r001.h5`), the Parquet indexes are
concatenated in rank order (so rows are in the order one process would have written them), the
failures are pooled, and the manifest is written last. Moving is idempotent, so a merge killed
half-way is finished by running it again.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pyarrow.parquet as pq

from diffret.cache.atomic import atomic_write_text
from diffret.cache.journal import Journal
from diffret.cache.layout import (
    CAPTION_SCHEMA, CAPTIONS_FILE, PARTS_DIR, SHARD_DIR, VIDEO_SCHEMA, VIDEOS_FILE, read_failures, write_failures,
    write_table,
)
from diffret.cache.manifest import CacheError, Manifest, ShardRecord, file_checksums, read_manifest, write_manifest


def part_dir(out: Path, rank: int) -> Path:
    """Where process `rank` writes its part of the cache."""
    return Path(out) / PARTS_DIR / f"rank-{rank:03d}"


def prepare_parts(out: Path, world: int, resume: bool) -> None:
    """Before a dump (rank 0 only): check that an unfinished dump being resumed was made by the
    same number of processes (each part holds one process's slice), and record `world`."""
    out = Path(out)
    marker = out / PARTS_DIR / "world.json"
    before = json.loads(marker.read_text())["world"] if marker.is_file() else (1 if Journal(out).entries() else None)
    if resume and before is not None and before != world:
        raise CacheError(f"the unfinished dump in {out} was made by {before} process(es), this run has {world}; "
                         f"re-run with {before} or pass --overwrite to start over")
    if world > 1:
        marker.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(marker, json.dumps({"world": world}) + "\n")


def _ranked(name: str, rank: int) -> str:
    p = Path(name)
    return f"{p.stem}-r{rank:03d}{p.suffix}"


def merge_parts(out: Path, world: int) -> Manifest:
    """Merge OUT/parts/rank-000 .. rank-<world-1> into the cache OUT; returns its manifest."""
    out = Path(out)
    manifests = [read_manifest(part_dir(out, r)) for r in range(world)]  # CacheError: a part is unfinished
    base = manifests[0]
    for r, m in enumerate(manifests[1:], 1):
        if (m.width, m.n_words, m.n_frames, m.fingerprint) != (base.width, base.n_words, base.n_frames, base.fingerprint):
            raise CacheError(f"part {r} of {out} was written by another stage-1 model or with other slots")
    (out / SHARD_DIR).mkdir(parents=True, exist_ok=True)
    shards: list[ShardRecord] = []
    rows: dict[str, list[dict]] = {CAPTIONS_FILE: [], VIDEOS_FILE: []}
    failures: dict[str, tuple[str, str, str]] = {}
    for r, m in enumerate(manifests):
        part = part_dir(out, r)
        renamed: dict[str, str] = {}
        for rec in m.shards:
            name = Path(rec.file).name
            src, dst = part / rec.file, out / SHARD_DIR / _ranked(name, r)
            if src.is_file():
                os.replace(src, dst)
            elif not dst.is_file():
                raise CacheError(f"shard {rec.file} of part {r} of {out} is missing")
            renamed[name] = dst.name
            shards.append(ShardRecord(file=f"{SHARD_DIR}/{dst.name}", kind=rec.kind, split=rec.split, rows=rec.rows,
                                      sha256=rec.sha256))
        for table in rows:
            for row in pq.read_table(part / table).to_pylist():
                row["shard"] = renamed.get(row["shard"], row["shard"])
                rows[table].append(row)
        for f in read_failures(part):
            failures.setdefault(f["video_id"], (f["video_id"], f["path"], f["reason"]))
    splits: dict[str, dict] = {}
    for table, key in ((CAPTIONS_FILE, "captions"), (VIDEOS_FILE, "videos")):
        for row in rows[table]:
            splits.setdefault(row["split"], {"captions": 0, "videos": 0})[key] += 1
    write_table(out / CAPTIONS_FILE, rows[CAPTIONS_FILE], CAPTION_SCHEMA)
    write_table(out / VIDEOS_FILE, rows[VIDEOS_FILE], VIDEO_SCHEMA)
    in_cache = {row["video_id"] for row in rows[VIDEOS_FILE]}  # a failure in training, read fine in the dump
    write_failures(out, sorted(f for v, f in failures.items() if v not in in_cache))
    base.shards, base.splits = shards, dict(sorted(splits.items()))
    base.files = file_checksums(out)  # the merged index files and OUT/stage1.pt (rank 0 wrote it before the dump)
    write_manifest(out, base)  # last: from here on OUT is a complete cache
    shutil.rmtree(out / PARTS_DIR, ignore_errors=True)
    Journal(out).clear()  # the run's settings, kept there while it was unfinished
    return base
