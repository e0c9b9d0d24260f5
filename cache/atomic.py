"""Atomic file writes: a reader sees the old file or the new one, never a half-written one.

Every file the project writes for later (cache shards, Parquet tables, manifest, journal, stage-1 and
generator checkpoints, evaluation and sweep reports) goes through here: the content goes to a hidden
temporary name in the same folder (`temp_name`: `.<name>.tmp-<pid>`, unique per process), is
flushed to disk (fsync) and only then renamed over the target. When the write fails (an exception,
a full disk, Ctrl-C) the temporary is removed and the target is left as it was; a process killed
outright leaves a temporary that `is_temp_name` recognises (the cache writer clears them on resume).
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator


def temp_name(path: Path) -> Path:
    """The hidden temporary name `path` is written under before its atomic rename."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def is_temp_name(name: str) -> bool:
    """True for a file name `temp_name` makes (a leftover of an interrupted write)."""
    return name.startswith(".") and ".tmp" in name


def atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """`write(tmp)` creates the file at the temporary path `tmp`; then fsync and rename it over `path`.

    For writers that take a path (h5py, pyarrow, torch.save, matplotlib's savefig with an explicit
    format: the temporary's name does not end in the target's suffix)."""
    path = Path(path)
    tmp = temp_name(path)
    try:
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:  # failed half-way: never leave the temporary behind
        if tmp.exists():
            tmp.unlink()


@contextmanager
def atomic_open(path: Path, mode: str = "wb", **kwargs) -> Iterator:
    """`with atomic_open(path, "w", newline="") as fh:` write to `fh`; on a clean exit it is flushed,
    fsync'ed and renamed over `path`, on an exception removed (`path` untouched)."""
    path = Path(path)
    tmp = temp_name(path)
    try:
        with open(tmp, mode, **kwargs) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` (UTF-8) to `path` atomically."""
    with atomic_open(path, "w", encoding="utf-8") as fh:
        fh.write(text)
