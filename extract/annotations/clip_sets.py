"""Loaders of the short-clip sets with many captions a clip: MSVD (YouTube2Text) and LSMDC.

Every caption keeps its own row (caption_id = f"{video_id}#{n}"); a split's captions all belong to
its videos, so MSVD's test split is evaluated with the multi-caption protocol.
"""
from __future__ import annotations

import pickle
from pathlib import Path

from .base import (
    SPLITS,
    VIDEO_EXTS,
    AnnotationError,
    Annotations,
    check_unique,
    find_videos,
    numbered,
    read_lines,
    require_file,
    require_root,
    video_folder,
)

# --------------------------------------------------------------------------- MSVD

MSVD_LISTS = {"train": "train_list.txt", "val": "val_list.txt", "test": "test_list.txt"}
MSVD_CAPTIONS = "raw-captions.pkl"


class _PlainUnpickler(pickle.Unpickler):
    """Unpickles builtin containers and strings only: an annotation file may not run code."""

    def find_class(self, module, name):
        raise AnnotationError(f"refusing to load {module}.{name}: {MSVD_CAPTIONS} must hold plain dicts/lists/strings")


def _msvd_captions(path: Path) -> dict[str, list[str]]:
    """raw-captions.pkl: {video_id: [[token, ...], ...]} -> {video_id: ["token token ...", ...]}."""
    try:
        with open(path, "rb") as f:
            data = _PlainUnpickler(f).load()
    except AnnotationError as e:
        raise AnnotationError(f"{path}: {e}") from None
    except Exception as e:
        raise AnnotationError(f"{path}: not a readable pickle ({type(e).__name__}: {e})") from None
    if not isinstance(data, dict):
        raise AnnotationError(f"{path}: expected a dict video_id -> list of token lists, got {type(data).__name__}")
    out: dict[str, list[str]] = {}
    for vid, caps in data.items():
        if not isinstance(caps, list) or not caps:
            raise AnnotationError(f"{path}: video {vid!r} has no list of captions")
        texts = []
        for i, c in enumerate(caps):
            if isinstance(c, str):
                texts.append(c.strip())
            elif isinstance(c, (list, tuple)) and all(isinstance(t, str) for t in c):
                texts.append(" ".join(t.strip() for t in c if t.strip()))
            else:
                raise AnnotationError(f"{path}: caption {i} of video {vid!r} is not a list of token strings")
        out[str(vid)] = texts
    return out


def load_msvd(root: Path, video_dir: str | None = None) -> Annotations:
    """MSVD (YouTube2Text) with the standard 1,200 / 100 / 670 split.

    root/{train,val,test}_list.txt  one video id per line (e.g. -4wsuPCjDBc_5_15).
    root/raw-captions.pkl           {video_id: [[token, ...], ...]}; caption = tokens joined by spaces.
    Every caption of a split's videos belongs to that split (about 40 per video; the test split
    is evaluated with the multi-caption protocol); caption_id = f"{video_id}#{n}".
    Videos: <video_dir or root/YouTubeClips or root/videos or root>/<id>.avi (.mp4 etc. also found).
    """
    root = require_root(root, "msvd")
    caps_path = require_file(root / MSVD_CAPTIONS, "msvd")
    lists = {split: require_file(root / name, "msvd") for split, name in MSVD_LISTS.items() if split != "val"}
    if (root / MSVD_LISTS["val"]).is_file():
        lists["val"] = root / MSVD_LISTS["val"]
    captions_of = _msvd_captions(caps_path)
    items = []
    for split in SPLITS:
        if split not in lists:
            continue
        for line, vid in read_lines(lists[split]):
            if vid not in captions_of:
                raise AnnotationError(f"{lists[split]} line {line}: video {vid!r} has no captions in {MSVD_CAPTIONS}")
            items += [(vid, text, split) for text in captions_of[vid]]
    captions = numbered(items)
    check_unique(captions, caps_path)
    ids = dict.fromkeys(c.video_id for c in captions)
    folder = video_folder(root, video_dir, ("YouTubeClips", "videos"))
    videos = find_videos(folder, {v: [v] for v in ids}, (".avi",) + VIDEO_EXTS)
    return Annotations(dataset="msvd", root=root, captions=captions, videos=videos)


# --------------------------------------------------------------------------- LSMDC

LSMDC_FILES = {
    "train": "LSMDC16_annos_training.csv",
    "val": "LSMDC16_annos_val.csv",
    "test": "LSMDC16_challenge_1000_publictect.csv",
}


def _lsmdc_rows(path: Path) -> list[tuple[str, str]]:
    """(clip_id, sentence) of a tab-separated LSMDC file (6 fields, no header)."""
    rows = []
    for line, text in read_lines(path):
        fields = text.split("\t")
        if len(fields) < 6:
            raise AnnotationError(
                f"{path} line {line}: expected 6 tab-separated fields (clip id, 4 times, sentence), got {len(fields)}"
            )
        clip, sentence = fields[0].strip(), "\t".join(fields[5:]).strip()
        if not clip or not sentence:
            raise AnnotationError(f"{path} line {line}: empty clip id or sentence")
        rows.append((clip, sentence))
    return rows


def load_lsmdc(root: Path, video_dir: str | None = None) -> Annotations:
    """LSMDC (the 2016 challenge files, as CLIP4Clip and DiffusionRet use them).

    root/LSMDC16_annos_training.csv, LSMDC16_annos_val.csv, LSMDC16_challenge_1000_publictect.csv:
    tab-separated, no header: clip_id, start_aligned, end_aligned, start_extracted, end_extracted,
    sentence. Train / val / test (the 1,000-clip public test); caption_id = f"{clip_id}#{n}".
    Videos: <video_dir or root/videos or root>/<movie>/<clip_id>.avi where movie is the clip id
    without its final "_<times>" part; clip_id.avi directly in the folder or anywhere below it
    (.mp4 etc.) is found as well.
    """
    root = require_root(root, "lsmdc")
    files = {s: require_file(root / n, "lsmdc") for s, n in LSMDC_FILES.items() if s != "val"}
    if (root / LSMDC_FILES["val"]).is_file():
        files["val"] = root / LSMDC_FILES["val"]
    items = [(clip, text, split) for split in SPLITS if split in files for clip, text in _lsmdc_rows(files[split])]
    captions = numbered(items)
    ids = dict.fromkeys(c.video_id for c in captions)
    folder = video_folder(root, video_dir)
    videos = find_videos(folder, {v: [f"{v.rsplit('_', 1)[0]}/{v}", v] for v in ids}, (".avi",) + VIDEO_EXTS)
    return Annotations(dataset="lsmdc", root=root, captions=captions, videos=videos)
