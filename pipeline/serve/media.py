"""The served files: opaque media ids, byte ranges, and streaming a video file.

A URL never carries a video id or a path (video ids of folder collections hold `/` and `..`): each
video of the collection gets an opaque `media_id`, the first 16 hex digits of
sha256(cache + NUL + video_id), stable across restarts. The table from media id to file is built
once at start-up from `Searcher.videos`, each path resolved then (a listed symlink is served as
the file it points to), and a request can only pick an entry of it: nothing from a request
becomes a path. The file is opened with O_NOFOLLOW, so a path swapped for a symlink after
start-up is refused rather than followed.
"""
from __future__ import annotations

import hashlib
import mimetypes
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

MEDIA_ID = re.compile(r"[0-9a-f]{16}")
CHUNK = 256 * 1024  # bytes a streamed read takes at a time


def media_id(cache: str, video_id: str) -> str:
    """The opaque id of one video of the collection: 16 hex digits."""
    return hashlib.sha256(f"{cache}\0{video_id}".encode("utf-8", "surrogatepass")).hexdigest()[:16]


@dataclass(frozen=True)
class MediaEntry:
    """One served video: its place in `Searcher.videos`, its metadata and its file (None: none listed)."""

    media_id: str
    index: int
    video: dict
    path: Path | None

    def metadata(self) -> dict:
        v = self.video
        return {"media_id": self.media_id, "video_index": self.index, "cache": v.get("cache"),
                "video_id": v.get("video_id"), "split": v.get("split"), "duration": v.get("duration"),
                "available": self.path is not None and self.path.is_file()}


class MediaTable:
    """media id -> MediaEntry for every video of a Searcher, resolved once."""

    def __init__(self, videos: list[dict]):
        self.entries: list[MediaEntry] = []
        self._by_id: dict[str, MediaEntry] = {}
        for i, v in enumerate(videos):
            mid = media_id(str(v.get("cache")), str(v.get("video_id")))
            if mid in self._by_id:  # the same video listed twice (two caches of one folder): keep the first
                self.entries.append(self._by_id[mid])
                continue
            path = _resolve(v.get("path"))
            entry = MediaEntry(mid, i, v, path)
            self.entries.append(entry)
            self._by_id[mid] = entry

    def __len__(self) -> int:
        return len(self._by_id)

    def get(self, mid: str) -> MediaEntry | None:
        """The entry of media id `mid`, or None for anything else (checked by shape, then looked up)."""
        if not isinstance(mid, str) or not MEDIA_ID.fullmatch(mid):
            return None
        return self._by_id.get(mid)

    def of_index(self, index: int) -> MediaEntry | None:
        return self.entries[index] if isinstance(index, int) and 0 <= index < len(self.entries) else None


def _resolve(path) -> Path | None:
    if not path:
        return None
    try:
        return Path(path).resolve()  # follows symlinks once, now
    except (OSError, RuntimeError):  # a symlink loop
        return None


def content_type(path: Path) -> str:
    return mimetypes.guess_type(path.name)[0] or "application/octet-stream"


def parse_range(header: str | None, size: int) -> tuple[int, int] | None | bool:
    """The byte range [start, end] (inclusive) that a Range header asks of a file of `size` bytes.

    None: serve the whole file (no header, another unit, bad syntax, several ranges: RFC 9110 lets a
    server ignore those). False: the range is not satisfiable (416). Forms: bytes=a-b, bytes=a-,
    bytes=-n (the last n bytes)."""
    if not header:
        return None
    m = re.fullmatch(r"\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*", header)
    if not m or (m[1] == "" and m[2] == "") or len(m[1]) > 18 or len(m[2]) > 18:
        return None
    if m[1] == "":  # a suffix: the last n bytes
        n = int(m[2])
        if n == 0 or size == 0:
            return False
        return max(0, size - n), size - 1
    start = int(m[1])
    if m[2] != "" and int(m[2]) < start:  # last < first: invalid syntax, ignored
        return None
    if start >= size:
        return False
    return start, size - 1 if m[2] == "" else min(int(m[2]), size - 1)


def open_file(path: Path) -> tuple[int, int] | None:
    """(file descriptor, size) of the regular file `path`, opened without following a symlink; None if
    it is gone, moved, unreadable or not a regular file."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            return None
    except OSError:
        os.close(fd)
        return None
    return fd, st.st_size
