"""One writer per output folder: an exclusive lock file, `<folder>/.diffret.lock`.

`diffret extract --out` and `diffret train-generator --out` hold it for the whole job (under torchrun
rank 0 holds it for every rank). The file records the holder, `{"host", "pid", "command", "started"}`,
and is locked with `fcntl.flock`, which the kernel releases when the holder dies in any way (an
exception, Ctrl-C, SIGTERM, SIGKILL; forked children close their copies of the fd, so none that
outlives a killed job keeps the lock). A second job on the same folder is refused with one line
naming the holder, whatever its settings. A lock file left by a process that died without removing
it (its pid no longer alive on this host, and nobody holding the flock) is stale and taken over; one
left by a process of another host, whose pid cannot be checked from here, is refused with a line that
says to delete the file if that job is gone.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

LOCK_FILE = ".diffret.lock"


class LockError(RuntimeError):
    """The output folder is held by another job (one-line message)."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


def _describe(holder: dict) -> str:
    return (f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, "
            f"command: {holder.get('command') or '?'}")


def _read(fd: int) -> dict:
    os.lseek(fd, 0, os.SEEK_SET)
    try:
        holder = json.loads(os.read(fd, 1 << 16).decode("utf-8") or "{}")
    except ValueError:
        return {}
    return holder if isinstance(holder, dict) else {}


_HELD: set[int] = set()  # this process's lock fds


def _drop_in_child() -> None:
    """A forked child (decoding helper, DataLoader worker) closes its copies of the lock fds: a flock
    belongs to the open file, so a child that outlives a killed job would otherwise keep the folder
    locked. Closing a copy leaves the parent's lock as it is."""
    for fd in _HELD:
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_drop_in_child)


class OutputLock:
    """`with OutputLock(folder):` the job's exclusive hold on `folder` (created if missing; when this
    lock created it and it is empty at release, it is removed again). `log`: told of a stale lock
    taken over. `command`: what the lock file records (default: this process's command line)."""

    def __init__(self, folder: Path, command: str | None = None, log=None):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_FILE
        self.command = command if command is not None else " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])
        self.log = log or (lambda msg: None)
        self._fd: int | None = None
        self._owner: int | None = None
        self._made_folder = False

    def acquire(self) -> "OutputLock":
        if self.folder.exists() and not self.folder.is_dir():
            raise LockError(f"--out {self.folder} is a file, not a folder")
        try:
            if not self.folder.exists():
                self.folder.mkdir(parents=True)
                self._made_folder = True
            return self._acquire()
        except OSError as e:
            self._remove_made_folder()
            raise LockError(f"cannot write to {self.folder}: {e.strerror or e}") from None
        except LockError:
            self._remove_made_folder()
            raise

    def _remove_made_folder(self) -> None:
        if self._made_folder:
            try:
                self.folder.rmdir()  # only when empty: a job refused before writing leaves nothing behind
            except OSError:
                pass
            self._made_folder = False

    def _acquire(self) -> "OutputLock":
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read(fd)
                os.close(fd)
                raise LockError(f"{self.folder} is in use by another diffret job ({_describe(holder)}); wait for it "
                                f"to finish or stop it") from None
            try:  # the holder may have removed the file between our open and our flock: lock the current one
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            break
        holder, host = _read(fd), socket.gethostname()
        if holder.get("pid") is not None:  # a lock file nobody holds: its writer died without removing it
            if holder.get("host") != host:
                os.close(fd)
                raise LockError(f"{self.folder} is locked by a job of another host ({_describe(holder)}) that this "
                                f"host cannot check; if that job is gone, delete {self.path}")
            if holder.get("pid") != os.getpid() and not _alive(int(holder["pid"])):
                self.log(f"taking over the stale lock of {self.folder} (pid {holder['pid']} is not running)")
        mine = {"host": host, "pid": os.getpid(), "command": self.command, "started": time.time()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(mine) + "\n").encode("utf-8"), 0)
        os.fsync(fd)
        self._fd, self._owner = fd, os.getpid()
        _HELD.add(fd)
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        if self._owner != os.getpid():  # a forked child's copy: its fd was closed at the fork, the lock is not ours
            self._fd = None
            return
        _HELD.discard(self._fd)
        try:
            self.path.unlink(missing_ok=True)  # unlinked while still locked: nobody can lock this file again
        finally:
            os.close(self._fd)
            self._fd = None
        self._remove_made_folder()

    def __enter__(self) -> "OutputLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
