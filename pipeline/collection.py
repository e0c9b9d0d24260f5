"""The videos a search runs over: one or several caches (same stage-1 model), one split or all.

`Collection` lists the videos in a fixed order (cache by cache as given, a cache's splits in its
sorted order, rows in the cache's order), reads any of their token rows (in memory for a small
collection, at raw offsets from the shards otherwise: cache/rows.py) and runs each cache's
first-stage index (cache/index.py). It raises SearchError (one line) for anything unusable.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from diffret.cache.index import IndexError_, has_index_files, load_index, pooled, search_index, video_rows
from diffret.cache.manifest import CacheError
from diffret.cache.rows import VideoRows
from diffret.cache.store import CacheReader

IN_MEMORY_BYTES = 1 << 30  # frame tokens of a collection up to this size are loaded; larger ones read row by row


class SearchError(ValueError):
    """A query or a collection that cannot be searched (one-line message)."""


@dataclass
class Part:
    """One cache of the collection: its selected splits as one block of rows."""

    root: Path
    reader: CacheReader
    splits: list[str]
    start: int  # first collection row
    rows: VideoRows | None = None  # lazy reading (large caches)
    data: dict | None = None  # in memory: {"frames", "frame_mask", "frame_logits", "frame_times"}
    index: object = None  # faiss index over every split of the cache (None: exhaustive first stage)
    index_entry: dict = field(default_factory=dict)
    index_ranges: list[tuple[int, int, int]] = field(default_factory=list)  # (index lo, index hi, part row lo)
    n: int = 0

    def read(self, local: np.ndarray) -> dict[str, np.ndarray]:
        if self.data is not None:
            return {k: v[local] for k, v in self.data.items()}
        return self.rows.read(local)


class Collection:
    """The videos of `caches` (paths) in `split` ("all": every split with videos)."""

    def __init__(self, caches: list, split: str = "all", in_memory_bytes: int = IN_MEMORY_BYTES,
                 use_index: bool = True):
        if not caches:
            raise SearchError("no cache given: pass at least one --cache")
        self.parts: list[Part] = []
        self.videos: list[dict] = []
        self.notes: list[str] = []
        first = None
        start = 0
        for c in caches:
            root = Path(c)
            try:
                reader = CacheReader(root)
            except CacheError as e:
                raise SearchError(str(e)) from None
            m = reader.manifest
            if first is None:
                first = (root, m)
            else:
                self._check_same(first, root, m)
            with_videos = [s for s in reader.splits if int(m.splits[s].get("videos", 0)) > 0]
            splits = with_videos if split == "all" else [s for s in with_videos if s == split]
            if not splits:
                continue
            part = Part(root, reader, splits, start)
            for s in splits:
                rows = reader.index("video", s)
                ids, paths = rows["video_id"].to_pylist(), rows["path"].to_pylist()
                durations = rows["duration"].to_pylist() if "duration" in rows.column_names else [None] * len(ids)
                for v, p, d in zip(ids, paths, durations):
                    self.videos.append({"cache": str(root), "video_id": v, "path": _resolved(p), "duration": d,
                                        "split": s})
            part.n = len(self.videos) - start
            start = len(self.videos)
            self._load(part, in_memory_bytes)
            if use_index:
                self._open_index(part)
            self.parts.append(part)
        if not self.videos:
            where = "the cache" if len(caches) == 1 else "the caches"
            raise SearchError(f"{where} {', '.join(map(str, caches))} hold no videos"
                              + (f" in split {split!r}" if split != "all" else ""))
        self.root, self.manifest = first
        self.starts = np.array([p.start for p in self.parts] + [len(self.videos)], dtype=np.int64)

    @staticmethod
    def _check_same(first, root: Path, m) -> None:
        r0, m0 = first
        if m.fingerprint != m0.fingerprint:
            raise SearchError(f"{root} was dumped by stage-1 model {m.fingerprint[:12] or '(unknown)'} but {r0} by "
                              f"{m0.fingerprint[:12] or '(unknown)'}; caches searched together need the same model "
                              f"(extract the new videos with --stage1 {r0}/stage1.pt)")
        for key in ("width", "n_words", "n_frames", "wti_padding"):
            if getattr(m, key) != getattr(m0, key):
                raise SearchError(f"{root} has {key} {getattr(m, key)} but {r0} has {getattr(m0, key)}; caches "
                                  f"searched together must match")

    @staticmethod
    def _load(part: Part, budget: int) -> None:
        m = part.reader.manifest
        need = part.n * m.n_frames * m.width * 2
        try:
            if need <= budget:
                feats = [part.reader.video(s) for s in part.splits]
                part.data = {k: np.concatenate([getattr(f, k) for f in feats])
                             for k in ("frames", "frame_mask", "frame_logits", "frame_times")}
            else:
                part.rows = VideoRows(part.reader, part.splits)
        except CacheError as e:
            raise SearchError(str(e)) from None

    def _open_index(self, part: Part) -> None:
        m = part.reader.manifest
        if not m.index:
            if has_index_files(part.root):
                self.notes.append(f"{part.root}: its index/ folder is not listed in the manifest (an interrupted "
                                  f"`diffret index`?): searched exhaustively; rebuild it with `diffret index`")
            return
        try:
            part.index, part.index_entry = load_index(part.root, m, checksum=False)
        except IndexError_ as e:
            raise SearchError(str(e)) from None
        lo, row = 0, 0
        for s, n in video_rows(m).items():  # the index covers every split, in the cache's split order
            if s in part.splits:
                part.index_ranges.append((lo, lo + n, row))
                row += n
            lo += n

    @property
    def indexed(self) -> bool:
        """Every cache has a first-stage index."""
        return all(p.index is not None for p in self.parts)

    def __len__(self) -> int:
        return len(self.videos)

    def read(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        """Collection rows [n] -> their token rows {"frames" [n, F, D], "frame_mask", "frame_logits", "frame_times"}."""
        rows = np.asarray(rows, dtype=np.int64)
        m = self.manifest
        out = {"frames": np.empty((len(rows), m.n_frames, m.width), np.float16),
               "frame_mask": np.empty((len(rows), m.n_frames), bool),
               "frame_logits": np.empty((len(rows), m.n_frames), np.float16),
               "frame_times": np.empty((len(rows), m.n_frames), np.float32)}
        which = np.searchsorted(self.starts, rows, side="right") - 1
        for p in np.unique(which).tolist():
            pick = np.nonzero(which == p)[0]
            got = self.parts[p].read(rows[pick] - self.parts[p].start)
            for k in out:
                out[k][pick] = got[k].astype(out[k].dtype, copy=False)
        return out

    def blocks(self, size: int = 8192):
        """Yield (first collection row, token rows of up to `size` videos) over the whole collection."""
        for s in range(0, len(self), size):
            yield s, self.read(np.arange(s, min(s + size, len(self))))

    def first_stage(self, words: np.ndarray, word_mask: np.ndarray, word_logits: np.ndarray, n: int):
        """The best n collection rows per query by the index's representation, over every cache ->
        (rows [q, n'] int64, scores [q, n'] float32), n' = min(n, collection size), best first."""
        q = pooled(words, word_mask, word_logits)
        n = min(n, len(self))
        all_rows, all_scores = [], []
        for p in self.parts:
            for lo, hi, row in p.index_ranges:
                got_s, got_r = search_index(p.index, q, min(n, hi - lo), lo, hi)
                ok = got_r >= 0
                all_rows.append(np.where(ok, got_r - lo + row + p.start, -1))
                all_scores.append(np.where(ok, got_s, -np.inf).astype(np.float32))
        rows, scores = np.concatenate(all_rows, 1), np.concatenate(all_scores, 1)
        order = np.argsort(-scores, axis=1, kind="stable")[:, :n]
        return np.take_along_axis(rows, order, 1), np.take_along_axis(scores, order, 1)


def _resolved(path: str | None) -> str | None:
    """The absolute, normalised path (no file-system call: a million videos load in seconds; the
    extractor records paths under the resolved --data-root)."""
    return os.path.abspath(path) if path else None
