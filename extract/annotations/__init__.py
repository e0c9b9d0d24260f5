"""Dataset annotations: which captions exist, which video each describes, and where it lives.

Every dataset loader returns the same `Annotations` object (base.py), so the extractor never
needs to know a dataset's file layout. `DATASETS` registers the loaders by lower-case name:
msrvtt (msrvtt.py), msvd and lsmdc (clip_sets.py), activitynet and didemo (paragraphs.py), and
manifest, a CSV or JSONL file for users' own videos (manifest.py), and folder, every video file
below a folder as a caption-less `gallery` (folder.py). Videos are looked up but never
opened here: a missing or unreadable video is recorded as a failure by the extractor.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from .base import SPLITS, VIDEO_EXTS, AnnotationError, Annotations, Caption, find_videos
from .clip_sets import load_lsmdc, load_msvd
from .folder import load_folder
from .manifest import load_manifest
from .msrvtt import load_msrvtt
from .paragraphs import load_activitynet, load_didemo

__all__ = [
    "COLLECTIONS", "DATASETS", "SPLITS", "VIDEO_EXTS", "AnnotationError", "Annotations", "Caption", "dataset_names",
    "find_videos",
    "load_activitynet", "load_annotations", "load_didemo", "load_lsmdc", "load_manifest", "load_msrvtt", "load_msvd",
]

DATASETS: dict[str, Callable[..., Annotations]] = {
    "msrvtt": load_msrvtt, "msvd": load_msvd, "lsmdc": load_lsmdc, "activitynet": load_activitynet,
    "didemo": load_didemo, "manifest": load_manifest,
}
# Collections without captions (a `gallery` split only): searched and indexed, never fine-tuned on or evaluated.
COLLECTIONS: dict[str, Callable[..., Annotations]] = {"folder": load_folder}


def dataset_names() -> list[str]:
    """The captioned datasets `load_annotations` accepts (besides the COLLECTIONS: folder)."""
    return list(DATASETS)


def load_annotations(dataset: str, root, video_dir: str | None = None) -> Annotations:
    """Load `dataset` (one of `dataset_names()` or COLLECTIONS, case-insensitive) from `root`."""
    loader = DATASETS.get(str(dataset).lower()) or COLLECTIONS.get(str(dataset).lower())
    if loader is None:
        raise ValueError(f"unknown dataset {dataset!r}; known: {', '.join(DATASETS)}")
    return loader(Path(root), video_dir=video_dir)
