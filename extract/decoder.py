"""A watchdog for video decoding: decode in a helper process, stop it when it overruns.

decord can hang or crash on damaged files. `decode_bounded` sends each request to a helper
process forked once per calling process (a DataLoader worker, or the main process) and waits
at most `timeout` seconds for the frames. A helper that overruns is killed and replaced; one that
dies on its own (a decoder crash) is replaced too; either way the video gets a one-line reason
and the run goes on. The helper only demuxes and decodes (decord / PyAV into NumPy, no torch);
it dies with its parent (PR_SET_PDEATHSIG on Linux) or when its request pipe closes.
Frames cross the pipe as their raw bytes after a small pickled header (shape, dtype), read
straight into the array the caller gets: no pickling of pixels, no intermediate copies; their
decoded timestamps (float32 [k]) follow the same way.
"""
from __future__ import annotations

import faulthandler
import os
import pickle
import select
import signal
import struct
import time
from pathlib import Path

import numpy as np

from . import video as _video

_HEADER = struct.Struct("<Q")


class _Timeout(Exception):
    pass


class _Closed(Exception):
    pass


def _write_all(fd: int, data) -> None:
    view = memoryview(data).cast("B")
    while view:
        view = view[os.write(fd, view):]


def _write(fd: int, obj) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    _write_all(fd, _HEADER.pack(len(data)) + data)


def _read_into(fd: int, view: memoryview, deadline: float | None) -> None:
    """Fill `view` from `fd`, waiting at most until `deadline` (time.monotonic) for each block."""
    poller = select.poll()
    poller.register(fd, select.POLLIN | select.POLLHUP)
    while view:
        if deadline is not None:
            wait = deadline - time.monotonic()
            if wait <= 0 or not poller.poll(max(1, int(wait * 1000))):
                raise _Timeout
        got = os.readv(fd, [view[:1 << 22]])
        if not got:
            raise _Closed
        view = view[got:]


def _read_exact(fd: int, n: int, deadline: float | None) -> bytes:
    buf = bytearray(n)
    _read_into(fd, memoryview(buf), deadline)
    return bytes(buf)


def _read(fd: int, deadline: float | None = None):
    (n,) = _HEADER.unpack(_read_exact(fd, _HEADER.size, deadline))
    return pickle.loads(_read_exact(fd, n, deadline))


def _send_frames(fd: int, arr: np.ndarray, times: np.ndarray) -> None:
    arr, times = np.ascontiguousarray(arr), np.ascontiguousarray(times, np.float32)
    _write(fd, ("ok", arr.shape, arr.dtype.str, len(times)))
    _write_all(fd, arr)
    _write_all(fd, times)


def _receive_frames(fd: int, shape, dtype: str, n_times: int, deadline: float | None
                    ) -> tuple[np.ndarray, np.ndarray]:
    arr = np.empty(shape, np.dtype(dtype))
    _read_into(fd, memoryview(arr).cast("B"), deadline)
    times = np.empty(n_times, np.float32)
    _read_into(fd, memoryview(times).cast("B"), deadline)
    return arr, times


def _die_with_parent() -> None:
    try:
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001  (not Linux: the closed request pipe still ends the helper)
        pass


def _serve(requests: int, results: int) -> None:
    """The helper's loop: (path, spec) in; ("ok", shape, dtype, k) + the frames' and timestamps' bytes, or
    ("err", reason), out; until EOF."""
    while True:
        try:
            path, spec = _read(requests)
        except _Closed:
            return
        try:
            arr, times = _video.decode_uint8(Path(path), spec)
        except _video.VideoDecodeError as e:
            _write(results, ("err", e.reason))
        except BaseException as e:  # noqa: BLE001  (decoder bugs on odd files)
            _write(results, ("err", f"{type(e).__name__}: {_video.first_line(e)}"))
        else:
            _send_frames(results, arr, times)


class _Helper:
    """The calling process's decoding helper (started on first use, replaced after a failure)."""

    def __init__(self):
        self.pid = self.owner = self.requests = self.results = None

    def start(self) -> None:
        import decord  # noqa: F401  (imported before forking, so the helper need not)

        req_r, req_w = os.pipe()
        res_r, res_w = os.pipe()
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                os.close(req_w)
                os.close(res_r)
                _die_with_parent()
                faulthandler.disable()  # a decoder crash is reported as one line, not a traceback dump
                _serve(req_r, res_w)
            except BaseException:  # noqa: BLE001
                code = 1
            finally:
                os._exit(code)
        os.close(req_r)
        os.close(res_w)
        self.pid, self.owner, self.requests, self.results = pid, os.getpid(), req_w, res_r

    def stop(self, kill: bool) -> int:
        """Close the pipes, reap the helper (killing it first if asked); returns its wait status."""
        for fd in (self.requests, self.results):
            os.close(fd)
        if kill:
            os.kill(self.pid, signal.SIGKILL)
        _, status = os.waitpid(self.pid, 0)
        self.pid = None
        return status

    def decode(self, path: Path, spec, timeout: float) -> tuple[np.ndarray, np.ndarray]:
        if self.pid is not None and self.owner != os.getpid():  # inherited through a fork: not ours
            os.close(self.requests)
            os.close(self.results)
            self.pid = None
        if self.pid is None:
            self.start()
        try:
            _write(self.requests, (str(path), spec))
            deadline = time.monotonic() + timeout
            kind, *value = _read(self.results, deadline)
            if kind == "ok":
                return _receive_frames(self.results, *value, deadline)
        except _Timeout:
            self.stop(kill=True)
            raise _video.VideoDecodeError(
                path, f"decoding took longer than {timeout:g} s (stopped; the file may be damaged)") from None
        except (_Closed, BrokenPipeError):
            status = self.stop(kill=False)
            sig = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
            how = f"signal {signal.Signals(sig).name}" if sig else f"exit status {os.WEXITSTATUS(status)}"
            raise _video.VideoDecodeError(path, f"the decoder crashed ({how})") from None
        raise _video.VideoDecodeError(path, value[0])


_helper = _Helper()


def stop_helper() -> None:
    """Stop this process's helper, if it has one; the next `decode_bounded` starts a fresh one."""
    if _helper.pid is not None and _helper.owner == os.getpid():
        _helper.stop(kill=True)


def decode_bounded(path: Path, spec, timeout: float) -> tuple[np.ndarray, np.ndarray]:
    """The sampled frames of `path` as uint8 [k, H, W, 3] and their timestamps (float32 [k], seconds),
    decoded by the helper process within
    `timeout` seconds; VideoDecodeError otherwise. Without fork (Windows), decodes in-process."""
    if not hasattr(os, "fork"):
        return _video.decode_uint8(Path(path), spec)
    return _helper.decode(Path(path), spec, timeout)
