"""File names and Parquet schemas of a cache directory, and Parquet writes (atomic: atomic.py).

    manifest.json                         (manifest.py)
    captions.parquet, videos.parquet      the row index: CAPTION_SCHEMA, VIDEO_SCHEMA
    failures.parquet                      videos that could not be read: FAILURE_SCHEMA
    shards/{text,video}-<split>-<nnnnn>.h5
    progress/                             only while an extraction is unfinished (journal.py)
    stage1.pt, train-state.pt             the stage-1 model, and an unfinished fine-tuning's last epoch
    parts/                                per-process parts while a torchrun dump is unfinished
    .diffret.lock                         while a job writes the folder (lock.py)

`cache_files` / `foreign_files` are the one list of what diffret writes into a cache folder:
`extract --overwrite` removes those and nothing else, and refuses a folder that holds anything else.
"""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from .atomic import atomic_write, is_temp_name
from .journal import PROGRESS_DIR, RUN_FILE, Journal
from .lock import LOCK_FILE

CAPTIONS_FILE = "captions.parquet"
VIDEOS_FILE = "videos.parquet"
FAILURES_FILE = "failures.parquet"
SHARD_DIR = "shards"
STAGE1_FILE = "stage1.pt"  # extract/checkpoint.py
FOLDER_INPUTS_FILE = "folder-inputs.parquet"  # a folder collection's files when extracted (extract/grow.py)
TRAIN_STATE_FILE = "train-state.pt"
PARTS_DIR = "parts"  # extract/merge.py
INDEX_DIR = "index"  # the first-stage search index (cache/index.py)
INDEX_FILES = ("first-stage.faiss",)
WRITE_PROBE_PREFIX = ".write-test-"  # extract/dump.py checks that --out can be written with such a file

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


# ------------------------------------------------------------------ what diffret writes into a cache folder

_SHARD = re.compile(r"(text|video)-.+-\d{5}(-r\d{3})?\.h5")
_ENTRY = re.compile(r"(text|video)-.+-\d{5}\.json")
_RANK = re.compile(r"rank-\d{3}")


def cache_files() -> set[str]:
    """The top-level file names diffret writes into a cache folder (with the folders CACHE_DIRS)."""
    from .manifest import MANIFEST_NAME  # manifest.py imports this module

    return {MANIFEST_NAME, CAPTIONS_FILE, VIDEOS_FILE, FAILURES_FILE, STAGE1_FILE, TRAIN_STATE_FILE, FOLDER_INPUTS_FILE}


CACHE_DIRS = (SHARD_DIR, PROGRESS_DIR, PARTS_DIR, INDEX_DIR)


def _temporary(name: str) -> bool:
    return is_temp_name(name) or name.startswith(WRITE_PROBE_PREFIX)


def _foreign_in(folder: Path, rel: str, extra: tuple[str, ...]) -> list[str]:
    """Paths (relative, `rel` + name) under the cache folder `folder` that diffret did not write."""
    files = cache_files() | set(extra)
    inside = {SHARD_DIR: lambda n: bool(_SHARD.fullmatch(n)), PROGRESS_DIR: lambda n: n == RUN_FILE or bool(
        _ENTRY.fullmatch(n)), INDEX_DIR: lambda n: n in INDEX_FILES}
    out = []
    for p in sorted(folder.iterdir()):
        name = p.name
        if name == LOCK_FILE or (p.is_file() and (name in files or _temporary(name))):
            continue
        if p.is_dir() and not p.is_symlink() and name in inside:
            out += [f"{rel}{name}/{q.name}" for q in sorted(p.iterdir())
                    if not (q.is_file() and (inside[name](q.name) or _temporary(q.name)))]
        elif p.is_dir() and not p.is_symlink() and name == PARTS_DIR:
            for q in sorted(p.iterdir()):
                if q.is_dir() and not q.is_symlink() and _RANK.fullmatch(q.name):
                    out += _foreign_in(q, f"{rel}{name}/{q.name}/", ())
                elif not (q.is_file() and (q.name == "world.json" or _temporary(q.name))):
                    out.append(f"{rel}{name}/{q.name}")
        else:
            out.append(rel + name + ("/" if p.is_dir() else ""))
    return out


def foreign_files(folder: Path, extra: tuple[str, ...] = ()) -> list[str]:
    """What `folder` holds that diffret did not write as a cache, as paths relative to it (sorted;
    folders end in "/"). `extra`: more top-level file names that count as diffret's (a generator's
    files, when a generator run lives in its cache folder)."""
    return _foreign_in(Path(folder), "", tuple(extra))


def is_empty_folder(folder: Path) -> bool:
    """True for a folder that holds nothing but a job's lock file."""
    return all(p.name == LOCK_FILE for p in Path(folder).iterdir())


def has_cache_marker(folder: Path) -> bool:
    """True when `folder` holds a file only diffret writes into a cache: the manifest, the progress
    journal's run record, or a stage-1 checkpoint (a folder's name, e.g. progress/, is no proof)."""
    from .manifest import MANIFEST_NAME

    folder = Path(folder)
    return (any((folder / n).is_file() for n in (MANIFEST_NAME, STAGE1_FILE, TRAIN_STATE_FILE))
            or "config" in (Journal(folder).read_run() or {}))


def remove_cache_files(folder: Path) -> list[str]:
    """Remove what diffret wrote into the cache folder `folder` (check `foreign_files` first: this
    removes the known top-level names, and their folders whole). -> the names removed."""
    folder, files, removed = Path(folder), cache_files(), []
    for p in sorted(folder.iterdir()):
        if p.is_dir() and not p.is_symlink() and p.name in CACHE_DIRS:
            shutil.rmtree(p)
        elif p.is_file() and (p.name in files or _temporary(p.name)):
            p.unlink()
        else:
            continue
        removed.append(p.name)
    return removed


def name_list(paths: list[str], most: int = 5) -> str:
    """The first `most` of `paths` for a one-line message ("a, b, ... (9 in all)")."""
    return ", ".join(paths[:most]) + (f", ... ({len(paths)} in all)" if len(paths) > most else "")


def refusal(out: Path, foreign: list[str], ours: bool, overwrite: bool, what: str) -> str | None:
    """Why a job may not write into the non-empty folder `out`, as one line, or None when it may:
    `foreign` (foreign_files) are files diffret did not write; `ours`: `out` holds something of
    diffret's (`what` names it in the message: "cache", "generator")."""
    if not ours:
        listed = foreign or sorted(p.name for p in Path(out).iterdir())
        return f"--out {out} is not empty and holds no diffret {what} ({name_list(listed)}); choose a new or empty folder"
    if foreign:
        return (f"--out {out} also holds files diffret did not write ({name_list(foreign)}); "
                + ("--overwrite removes only diffret's own files: " if overwrite else "")
                + "move them away or choose another folder")
    return None

