"""What every annotation loader shares: the `Annotations` it returns and the file parsing helpers.

A loader turns a dataset's files into `Annotations` (captions, the video each describes, its
split, the file of every video). The helpers read JSON, headed CSV and line files with errors
that name the file and line (`AnnotationError`), number captions per video and find video files.
"""
from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

SPLITS = ("train", "val", "test")


class AnnotationError(ValueError):
    """A malformed annotation file; the message names the file (and the line where known)."""


@dataclass(frozen=True)
class Caption:
    """One text query: a unique id, the video it describes, its text and its split."""

    caption_id: str  # unique within the dataset, e.g. "video7#3" (train) or "ret0" (MSRVTT test)
    video_id: str
    text: str
    split: str  # "train" | "test" (| "val" for datasets that have one)


@dataclass
class Annotations:
    """All captions of a dataset, plus the file of every video they reference."""

    dataset: str
    root: Path
    captions: list[Caption]
    videos: dict[str, Path] = field(default_factory=dict)  # video_id -> video file

    def split(self, name: str) -> list[Caption]:
        """The captions of split `name`, in file order (empty if the dataset lacks that split)."""
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; known: {', '.join(SPLITS)}")
        return [c for c in self.captions if c.split == name]

    def video_ids(self, split: str) -> list[str]:
        """The distinct videos of split `split`, in order of first appearance among its captions."""
        return list(dict.fromkeys(c.video_id for c in self.split(split)))

    def splits(self) -> list[str]:
        """The splits that have at least one caption, in `SPLITS` order."""
        present = {c.split for c in self.captions}
        return [s for s in SPLITS if s in present]


# --------------------------------------------------------------------------- file helpers


def require_root(root: Path, dataset: str) -> Path:
    """`root` as a Path (with ~ expanded); FileNotFoundError unless it is a folder."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"{dataset} annotation root {root} does not exist or is not a directory")
    return root


def require_file(path: Path, dataset: str) -> Path:
    """`path`; FileNotFoundError naming the dataset unless it is a file."""
    if not path.is_file():
        raise FileNotFoundError(f"{dataset} annotation file {path} is missing")
    return path


def not_utf8(path: Path) -> AnnotationError:
    """The error for a file that is not UTF-8 text, naming the line of its first bad byte."""
    raw = path.read_bytes()
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1  # (no backslash inside an f-string before Python 3.12)
        return AnnotationError(f"{path} line {line}: not UTF-8 text ({e.reason} at "
                               f"byte {e.start}); save the file as UTF-8")
    return AnnotationError(f"{path}: not UTF-8 text")


def read_json(path: Path) -> object:
    """The parsed JSON of a UTF-8 file (a BOM is allowed); AnnotationError names the line."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise not_utf8(path) from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise AnnotationError(f"{path} line {e.lineno} column {e.colno}: invalid JSON: {e.msg}") from None


def read_csv(path: Path, columns: tuple[str, ...]) -> list[tuple[int, dict[str, str]]]:
    """Rows of a headed CSV as (line number, {column: stripped value}); all `columns` required."""
    rows: list[tuple[int, dict[str, str]]] = []
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            header = [h.strip() for h in (reader.fieldnames or [])]
            if not header:
                raise AnnotationError(f"{path} line 1: empty file, expected a header with {', '.join(columns)}")
            reader.fieldnames = header
            missing = [c for c in columns if c not in header]
            if missing:
                raise AnnotationError(
                    f"{path} line 1: missing column {', '.join(map(repr, missing))} "
                    f"(header has {', '.join(map(repr, header))})"
                )
            for row in reader:
                line = reader.line_num
                if not any((v or "").strip() for k, v in row.items() if k is not None):
                    continue  # blank line
                values = {c: (row.get(c) or "").strip() for c in columns}
                empty = [c for c in columns if not values[c]]
                if empty:
                    raise AnnotationError(f"{path} line {line}: empty or missing value for {', '.join(empty)}")
                rows.append((line, values))
    except UnicodeDecodeError:
        raise not_utf8(path) from None
    except csv.Error as e:
        raise AnnotationError(f"{path}: malformed CSV: {e}") from None
    return rows


def check_unique(captions: list[Caption], where: Path) -> None:
    """AnnotationError (naming `where`) at the first repeated caption id."""
    seen: set[str] = set()
    for c in captions:
        if c.caption_id in seen:
            raise AnnotationError(f"{where}: duplicate caption id {c.caption_id!r}")
        seen.add(c.caption_id)


VIDEO_EXTS = (".mp4", ".avi", ".mkv", ".webm", ".mov", ".m4v", ".mpg", ".mpeg", ".wmv", ".flv", ".3gp")


def id_text_pairs(items: list, path: Path, id_key: str, text_key: str, entry: str,
                  strip_text: bool) -> list[tuple[str, str]]:
    """(id, text) of every object in `items` (the JSON list read from `path`), in file order; a
    malformed entry is one AnnotationError naming it (`entry` formats its place: "entry {i}")."""
    out: list[tuple[str, str]] = []
    for i, item in enumerate(items):
        where = entry.format(i=i)
        if not isinstance(item, dict):
            raise AnnotationError(f"{path}: {where} is not an object")
        vid, text = item.get(id_key), item.get(text_key)
        if not isinstance(vid, str) or not vid.strip():
            raise AnnotationError(f"{path}: {where} has no string '{id_key}'")
        if not isinstance(text, str):
            raise AnnotationError(f"{path}: {where} (video {vid}) has no string '{text_key}'")
        out.append((vid.strip(), text.strip() if strip_text else text))
    return out


def video_folder(root: Path, video_dir: str | None, defaults: tuple[str, ...] = ("videos",)) -> Path:
    """`video_dir` (relative to root, or absolute); else the first of root/<defaults> that exists; else root."""
    if video_dir is not None:
        return root / video_dir
    for name in defaults:
        if (root / name).is_dir():
            return root / name
    return root


def find_videos(
    folder: Path, candidates: dict[str, list[str]], exts: Iterable[str] = VIDEO_EXTS,
) -> dict[str, Path]:
    """video_id -> file, for every id of `candidates` (id -> file names to try, without extension).

    Each name is tried as given (it may carry its extension or a sub-folder), then with each of
    `exts`, directly under `folder`. Ids still unmatched are looked up once by a walk of `folder`
    (file name or stem, any depth, first in sorted order). An id found nowhere maps to
    folder/<first name>[<first ext>], so the extractor reports it as a missing file.
    """
    exts = tuple(exts)
    out: dict[str, Path] = {}
    missing: list[str] = []
    for vid, names in candidates.items():
        for name in names:
            hit = next((folder / f"{name}{e}" for e in ("", *exts) if (folder / f"{name}{e}").is_file()), None)
            if hit is not None:
                out[vid] = hit
                break
        else:
            missing.append(vid)
    if missing and folder.is_dir():
        index: dict[str, Path] = {}
        for dirpath, dirnames, filenames in os.walk(folder):
            dirnames.sort()
            for f in sorted(filenames):
                p = Path(dirpath) / f
                index.setdefault(f, p)
                if p.suffix.lower() in exts:
                    index.setdefault(p.stem, p)
        for vid in missing:
            hit = next((index[n] for n in candidates[vid] if n in index), None)
            if hit is not None:
                out[vid] = hit
    for vid in missing:
        first = candidates[vid][0]
        out.setdefault(vid, folder / (first if Path(first).suffix.lower() in exts else f"{first}{exts[0]}"))
    return {vid: out[vid] for vid in candidates}


def read_lines(path: Path) -> list[tuple[int, str]]:
    """Non-blank lines of a text file as (line number, stripped text)."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise not_utf8(path) from None
    return [(i, line.strip()) for i, line in enumerate(text.splitlines(), 1) if line.strip()]


def numbered(items: Iterable[tuple[str, str, str]]) -> list[Caption]:
    """(video_id, text, split) -> Captions with id f"{video_id}#{n}", n counting within the video."""
    seen: dict[str, int] = {}
    out = []
    for vid, text, split in items:
        n = seen.get(vid, 0)
        seen[vid] = n + 1
        out.append(Caption(f"{vid}#{n}", vid, text, split))
    return out
