"""Dataset annotations: which captions exist, which video each describes, and where it lives.

Every dataset loader returns the same `Annotations` object, so the extractor never needs to
know a dataset's file layout. Loaders are registered by lower-case name (`dataset_names()`):
msrvtt (here), msvd, lsmdc (clip_sets.py), activitynet, didemo (paragraphs.py) and manifest, a CSV or JSONL
file for users' own videos (own_videos.py). Videos are looked up but never opened here: a
missing or unreadable video is recorded as a failure by the extractor.
"""
from __future__ import annotations

import csv
import json
import os
from collections.abc import Callable, Iterable
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


def _require_root(root: Path, dataset: str) -> Path:
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"{dataset} annotation root {root} does not exist or is not a directory")
    return root


def _require_file(path: Path, dataset: str) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"{dataset} annotation file {path} is missing")
    return path


def _not_utf8(path: Path) -> AnnotationError:
    """The error for a file that is not UTF-8 text, naming the line of its first bad byte."""
    raw = path.read_bytes()
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1  # (no backslash inside an f-string before Python 3.12)
        return AnnotationError(f"{path} line {line}: not UTF-8 text ({e.reason} at "
                               f"byte {e.start}); save the file as UTF-8")
    return AnnotationError(f"{path}: not UTF-8 text")


def _read_json(path: Path) -> object:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise _not_utf8(path) from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise AnnotationError(f"{path} line {e.lineno} column {e.colno}: invalid JSON: {e.msg}") from None


def _read_csv(path: Path, columns: tuple[str, ...]) -> list[tuple[int, dict[str, str]]]:
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
        raise _not_utf8(path) from None
    except csv.Error as e:
        raise AnnotationError(f"{path}: malformed CSV: {e}") from None
    return rows


def _check_unique(captions: list[Caption], where: Path) -> None:
    seen: set[str] = set()
    for c in captions:
        if c.caption_id in seen:
            raise AnnotationError(f"{where}: duplicate caption id {c.caption_id!r}")
        seen.add(c.caption_id)


def _video_paths(root: Path, video_dir: str | None, video_ids, ext: str = ".mp4") -> dict[str, Path]:
    """video_id -> root/video_dir/<id><ext>; default folder root/videos if present, else root."""
    if video_dir is not None:
        folder = root / video_dir  # an absolute `video_dir` replaces root
    elif (root / "videos").is_dir():
        folder = root / "videos"
    else:
        folder = root
    return {vid: folder / f"{vid}{ext}" for vid in video_ids}


VIDEO_EXTS = (".mp4", ".avi", ".mkv", ".webm", ".mov", ".m4v", ".mpg", ".mpeg", ".wmv", ".flv", ".3gp")


def _video_folder(root: Path, video_dir: str | None, defaults: tuple[str, ...] = ("videos",)) -> Path:
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


def _read_lines(path: Path) -> list[tuple[int, str]]:
    """Non-blank lines of a text file as (line number, stripped text)."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise _not_utf8(path) from None
    return [(i, line.strip()) for i, line in enumerate(text.splitlines(), 1) if line.strip()]


def _numbered(items: Iterable[tuple[str, str, str]]) -> list[Caption]:
    """(video_id, text, split) -> Captions with id f"{video_id}#{n}", n counting within the video."""
    seen: dict[str, int] = {}
    out = []
    for vid, text, split in items:
        n = seen.get(vid, 0)
        seen[vid] = n + 1
        out.append(Caption(f"{vid}#{n}", vid, text, split))
    return out


# --------------------------------------------------------------------------- MSRVTT

MSRVTT_JSON = "MSRVTT_data.json"
MSRVTT_TRAIN_CSV = "MSRVTT_train.9k.csv"
MSRVTT_TEST_CSV = "MSRVTT_JSFUSION_test.csv"


def _msrvtt_sentences(path: Path) -> list[tuple[str, str]]:
    """(video_id, caption) of every entry of `sentences` in MSRVTT_data.json, in file order."""
    data = _read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("sentences"), list):
        raise AnnotationError(f"{path}: expected a JSON object with a 'sentences' list")
    out: list[tuple[str, str]] = []
    for i, s in enumerate(data["sentences"]):
        if not isinstance(s, dict):
            raise AnnotationError(f"{path}: sentences[{i}] is not an object")
        vid, text = s.get("video_id"), s.get("caption")
        if not isinstance(vid, str) or not vid.strip():
            raise AnnotationError(f"{path}: sentences[{i}] has no string 'video_id'")
        if not isinstance(text, str):
            raise AnnotationError(f"{path}: sentences[{i}] (video {vid}) has no string 'caption'")
        out.append((vid.strip(), text.strip()))
    return out


def load_msrvtt(root: Path, video_dir: str | None = None) -> Annotations:
    """MSR-VTT with the 9k train / 1k-A (JSFusion) test split used by CLIP4Clip and DiffusionRet.

    root/MSRVTT_data.json        `sentences[].{video_id, caption}` (all 200k captions)
    root/MSRVTT_train.9k.csv     column `video_id`: train videos. Train = every caption of those
                                 videos, in json order; caption_id = f"{video_id}#{i}", i = the
                                 caption's index among that video's sentences in the json.
    root/MSRVTT_JSFUSION_test.csv  columns key,vid_key,video_id,sentence: 1000 test pairs, one
                                 caption per video; caption_id = key.
    Videos: root/<video_dir>/<id>.mp4; by default root/videos/ if it exists, else root/.
    """
    root = _require_root(root, "msrvtt")
    json_path = _require_file(root / MSRVTT_JSON, "msrvtt")
    train_path = _require_file(root / MSRVTT_TRAIN_CSV, "msrvtt")
    test_path = _require_file(root / MSRVTT_TEST_CSV, "msrvtt")

    sentences = _msrvtt_sentences(json_path)
    train_rows = _read_csv(train_path, ("video_id",))
    test_rows = _read_csv(test_path, ("key", "vid_key", "video_id", "sentence"))

    per_video: dict[str, int] = {}
    numbered: list[tuple[str, int, str]] = []  # (video_id, index within video, text)
    for vid, text in sentences:
        n = per_video.get(vid, 0)
        per_video[vid] = n + 1
        numbered.append((vid, n, text))

    train_ids: set[str] = set()
    for line, row in train_rows:
        vid = row["video_id"]
        if vid not in per_video:
            raise AnnotationError(f"{train_path} line {line}: video {vid!r} has no captions in {json_path.name}")
        train_ids.add(vid)

    captions = [Caption(f"{vid}#{n}", vid, text, "train") for vid, n, text in numbered if vid in train_ids]
    first_line: dict[str, int] = {}
    for line, row in test_rows:  # a repeated key is a broken file: name both lines
        if first_line.setdefault(row["key"], line) != line:
            raise AnnotationError(f"{test_path} line {line}: duplicate caption id {row['key']!r} (key also on line "
                                 f"{first_line[row['key']]})")
    captions += [Caption(row["key"], row["video_id"], row["sentence"], "test") for _, row in test_rows]
    _check_unique(captions, test_path)

    videos = _video_paths(root, video_dir, dict.fromkeys(c.video_id for c in captions))
    return Annotations(dataset="msrvtt", root=root, captions=captions, videos=videos)


# --------------------------------------------------------------------------- registry


def _registry() -> dict[str, Callable[..., Annotations]]:
    from .clip_sets import load_lsmdc, load_msvd
    from .own_videos import load_manifest
    from .paragraphs import load_activitynet, load_didemo

    return {"msrvtt": load_msrvtt, "msvd": load_msvd, "lsmdc": load_lsmdc, "activitynet": load_activitynet,
            "didemo": load_didemo, "manifest": load_manifest}


def dataset_names() -> list[str]:
    """The names `load_annotations` accepts."""
    return list(_registry())


def load_annotations(dataset: str, root, video_dir: str | None = None) -> Annotations:
    """Load `dataset` (one of `dataset_names()`, case-insensitive) from `root`."""
    registry = _registry()
    loader = registry.get(str(dataset).lower())
    if loader is None:
        raise ValueError(f"unknown dataset {dataset!r}; known: {', '.join(registry)}")
    return loader(Path(root), video_dir=video_dir)
