"""Loaders of the paragraph-to-video sets: ActivityNet Captions and DiDeMo.

Both annotate moments of long videos with several sentences; for video retrieval (as
CLIP4Clip and DiffusionRet evaluate them) a video's sentences are joined, in file order, into
one paragraph: one caption per video, caption_id = video_id. Their default slots are 64 frames
and 64 words (extract/config.py's DATASET_SLOTS).
"""
from __future__ import annotations

from pathlib import Path

from .base import (
    SPLITS,
    VIDEO_EXTS,
    AnnotationError,
    Annotations,
    Caption,
    find_videos,
    id_text_pairs,
    read_json,
    require_file,
    require_root,
    video_folder,
)

ACTIVITYNET_FILES = {"train": "train.json", "test": "val_1.json"}
DIDEMO_FILES = {"train": "train_data.json", "val": "val_data.json", "test": "test_data.json"}


def _paragraph(sentences: list[str]) -> str:
    return " ".join(s.strip() for s in sentences if s.strip())


def _activitynet_split(path: Path, split: str) -> list[Caption]:
    """{video_id: {"duration", "timestamps", "sentences": [...]}} -> one paragraph caption per video."""
    data = read_json(path)
    if not isinstance(data, dict):
        raise AnnotationError(f"{path}: expected a JSON object video_id -> {{'sentences': [...], ...}}")
    out = []
    for vid, entry in data.items():
        sentences = entry.get("sentences") if isinstance(entry, dict) else None
        if not isinstance(sentences, list) or not all(isinstance(s, str) for s in sentences):
            raise AnnotationError(f"{path}: video {vid!r} has no 'sentences' list of strings")
        text = _paragraph(sentences)
        if not text:
            raise AnnotationError(f"{path}: video {vid!r} has only empty sentences")
        out.append(Caption(vid, vid, text, split))
    return out


def load_activitynet(root: Path, video_dir: str | None = None) -> Annotations:
    """ActivityNet Captions, paragraph-to-video retrieval: train.json for training, val_1.json as test.

    Each file maps a video id (e.g. v_QOlSCBRmfWY) to {"duration", "timestamps", "sentences"};
    the paragraph is the video's sentences joined by spaces. Videos: <video_dir or root/videos or
    root>/<id>.mp4, also found without the "v_" prefix, with another extension (.mkv, .webm, ...)
    or in a sub-folder.
    """
    root = require_root(root, "activitynet")
    captions = []
    for split, name in ACTIVITYNET_FILES.items():
        captions += _activitynet_split(require_file(root / name, "activitynet"), split)
    seen: set[str] = set()
    for c in captions:  # a video in both files would make its caption id ambiguous
        if c.caption_id in seen:
            raise AnnotationError(f"{root}: video {c.video_id!r} is in both {' and '.join(ACTIVITYNET_FILES.values())}")
        seen.add(c.caption_id)
    names = {c.video_id: [c.video_id] + ([c.video_id[2:]] if c.video_id.startswith("v_") else []) for c in captions}
    videos = find_videos(video_folder(root, video_dir), names)
    return Annotations(dataset="activitynet", root=root, captions=captions, videos=videos)


def _didemo_split(path: Path) -> list[tuple[str, str]]:
    """[{"video", "description", "times", ...}, ...] -> (video, description) in file order."""
    data = read_json(path)
    if not isinstance(data, list):
        raise AnnotationError(f"{path}: expected a JSON list of {{'video', 'description', ...}} objects")
    return id_text_pairs(data, path, "video", "description", "entry {i}", strip_text=False)


def load_didemo(root: Path, video_dir: str | None = None) -> Annotations:
    """DiDeMo, paragraph-to-video retrieval: {train,val,test}_data.json (val optional).

    Each file is a list of moments {"video", "description", "times", ...}; a video's paragraph
    is its descriptions joined by spaces in file order; video_id = the "video" field. Videos:
    <video_dir or root/videos or root>/<video> as named, or its stem with any video extension
    (e.g. the .mp4 re-encodes), also in sub-folders. The original's loader reads each video from
    second 0 to second 31 only (its moments stop at 30 s): `diffret extract` samples the same
    seconds by default (extract/config.py's DATASET_END_SECOND, --end-second).
    """
    root = require_root(root, "didemo")
    files = {s: require_file(root / n, "didemo") for s, n in DIDEMO_FILES.items() if s != "val"}
    if (root / DIDEMO_FILES["val"]).is_file():
        files["val"] = root / DIDEMO_FILES["val"]
    captions, split_of = [], {}
    for split in SPLITS:
        if split not in files:
            continue
        texts: dict[str, list[str]] = {}
        for vid, text in _didemo_split(files[split]):
            if split_of.setdefault(vid, split) != split:
                raise AnnotationError(f"{files[split]}: video {vid!r} is also in the {split_of[vid]} split")
            texts.setdefault(vid, []).append(text)
        captions += [Caption(vid, vid, _paragraph(t), split) for vid, t in texts.items() if _paragraph(t)]
    names = {}
    for c in captions:
        stem = Path(c.video_id).stem if Path(c.video_id).suffix.lower() in VIDEO_EXTS else c.video_id
        names[c.video_id] = list(dict.fromkeys([c.video_id, stem]))
    videos = find_videos(video_folder(root, video_dir), names)
    return Annotations(dataset="didemo", root=root, captions=captions, videos=videos)
