"""Thumbnails: one frame of a video at a time t, decoded on demand, as a JPEG, kept in a bounded
in-memory LRU cache.

A frame is decoded with decord (PyAV where decord fails on a file), scaled down to the served
width (never up) and encoded with Pillow. Times are rounded to 0.1 s for the cache key, so a page
of results asks the decoder once per moment. A video that is gone, moved or undecodable gets the
placeholder image (the page still shows the hit); the caller counts those.
"""
from __future__ import annotations

import io
import math
import os
import stat
import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np

TIME_STEP = 0.1  # seconds: thumbnail times are rounded to this


class LRUBytes:
    """A thread-safe least-recently-used map of key -> bytes, bounded by the total bytes held."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max(0, int(max_bytes))
        self._items: OrderedDict = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def get(self, key) -> bytes | None:
        with self._lock:
            value = self._items.get(key)
            if value is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return value

    def put(self, key, value: bytes) -> None:
        if len(value) > self.max_bytes:
            return
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= len(old)
            self._items[key] = value
            self._bytes += len(value)
            while self._bytes > self.max_bytes:
                _, dropped = self._items.popitem(last=False)
                self._bytes -= len(dropped)

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._items)


def round_time(t: float) -> float:
    return round(round(t / TIME_STEP) * TIME_STEP, 3)


def _decode_decord(path: Path, t: float) -> np.ndarray:
    import decord

    vr = decord.VideoReader(str(path), num_threads=1)
    try:
        n, fps = len(vr), float(vr.get_avg_fps())
        if n < 1:
            raise ValueError("no frames")
        index = min(n - 1, max(0, int(math.floor(t * fps)))) if math.isfinite(fps) and fps > 0 else 0
        frame = vr[index]
        return frame.asnumpy() if hasattr(frame, "asnumpy") else np.asarray(frame)
    finally:
        del vr


def _decode_pyav(path: Path, t: float) -> np.ndarray:
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        last = None
        for frame in container.decode(stream):
            when = float(frame.pts * frame.time_base) if frame.pts is not None and frame.time_base else 0.0
            if last is not None and when > t + 1e-6:
                break
            last = frame.to_ndarray(format="rgb24")
        if last is None:
            raise ValueError("no frames")
        return last


def decode_frame(path: Path, t: float) -> np.ndarray:
    """The frame of `path` shown at time `t` (seconds; past the end: the last frame) as uint8
    [H, W, 3] RGB. Raises on a missing or undecodable file."""
    try:
        return _decode_decord(path, t)
    except Exception:  # noqa: BLE001  decord fails on some widths and streams: PyAV decodes those
        return _decode_pyav(path, t)


def encode_jpeg(frame: np.ndarray, width: int, quality: int = 85) -> bytes:
    """`frame` [H, W, 3] uint8 scaled to `width` pixels wide (never up) as JPEG bytes."""
    from PIL import Image

    img = Image.fromarray(np.ascontiguousarray(frame[..., :3]), "RGB")
    if img.width > width:
        img = img.resize((width, max(1, round(img.height * width / img.width))), Image.BICUBIC)
    out = io.BytesIO()
    img.save(out, "JPEG", quality=quality)
    return out.getvalue()


def placeholder_jpeg(width: int) -> bytes:
    """A grey 16:9 JPEG with a crossed-out frame: the thumbnail of a video that cannot be shown."""
    from PIL import Image, ImageDraw

    w, h = max(16, width), max(9, width * 9 // 16)
    img = Image.new("RGB", (w, h), (72, 72, 80))
    draw = ImageDraw.Draw(img)
    m = min(w, h) // 6
    draw.rectangle((m, m, w - m, h - m), outline=(140, 140, 150), width=max(1, w // 80))
    draw.line((m, m, w - m, h - m), fill=(140, 140, 150), width=max(1, w // 80))
    draw.line((m, h - m, w - m, m), fill=(140, 140, 150), width=max(1, w // 80))
    out = io.BytesIO()
    img.save(out, "JPEG", quality=80)
    return out.getvalue()


def is_regular_file(path: Path | None) -> bool:
    """True if `path` is a regular file now and not a symlink (paths were resolved at start-up)."""
    if path is None:
        return False
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


class Thumbnails:
    """JPEG thumbnails by (media id, time), decoded at most `max_decoders` at once, cached by bytes."""

    def __init__(self, width: int, cache_bytes: int, max_decoders: int = 2):
        self.width = width
        self.cache = LRUBytes(cache_bytes)
        self.placeholder = placeholder_jpeg(width)
        self._decoders = threading.BoundedSemaphore(max_decoders)
        self.failures = 0

    def cached(self, key: str, t: float) -> bytes | None:
        """The JPEG of (key, t) if it is in memory (non-blocking: answered without a worker thread)."""
        return self.cache.get((key, round_time(t)))

    def get(self, key: str, path: Path | None, t: float) -> tuple[bytes, bool]:
        """(JPEG bytes, True) for frame `t` of `path`, or (the placeholder, False) when the file is
        gone or cannot be decoded. Blocking: run it in a worker thread."""
        t = round_time(t)
        cached = self.cache.get((key, t))
        if cached is not None:
            return cached, True
        if not is_regular_file(path):
            return self.placeholder, False
        with self._decoders:
            cached = self.cache.get((key, t))  # another request decoded it while this one waited
            if cached is not None:
                return cached, True
            try:
                data = encode_jpeg(decode_frame(path, t), self.width)
            except Exception:  # noqa: BLE001  any decoder failure: the placeholder, never a 500
                self.failures += 1
                return self.placeholder, False
        self.cache.put((key, t), data)
        return data, True
