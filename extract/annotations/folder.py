"""A folder of videos as a collection: `--dataset folder --data-root DIR`, no captions needed.

Every file below DIR (recursively, hidden folders and files skipped) whose extension is a common
video one (VIDEO_EXTS, any case) is a video of the `gallery` split; its id is its path relative to
DIR with forward slashes (`trips/2024/beach.mp4`), so ids are stable when DIR moves. There are no
captions: such a cache is dumped with an existing stage-1 model (`--stage1 PATH`, or `--pretrained`
with `--epochs 0`), searched by `diffret search` and indexed by `diffret index`; `evaluate` refuses
it (no queries). Re-running the same command after adding videos extracts only the new ones
(extract/grow.py); a changed or removed file is refused, naming it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .base import VIDEO_EXTS, AnnotationError, Annotations, Caption

GALLERY = "gallery"


@dataclass
class FolderAnnotations(Annotations):
    """Annotations of a folder: videos only, all in the `gallery` split."""

    dump_splits: tuple[str, ...] = (GALLERY,)  # the splits `extract` dumps (captioned datasets: train, test)

    def split(self, name: str) -> list[Caption]:
        return []  # no captions in any split

    def video_ids(self, split: str) -> list[str]:
        return list(self.videos) if split == GALLERY else []

    def splits(self) -> list[str]:
        return [GALLERY] if self.videos else []


def list_videos(root: Path) -> dict[str, Path]:
    """{relative id: file} of every video file below `root`, in sorted path order."""
    out: dict[str, Path] = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for f in sorted(filenames):
            if f.startswith(".") or Path(f).suffix.lower() not in VIDEO_EXTS:
                continue
            p = Path(dirpath) / f
            out[p.relative_to(root).as_posix()] = p
    return dict(sorted(out.items()))


def load_folder(root: Path, video_dir: str | None = None) -> FolderAnnotations:
    """The videos below `root` (or below root/video_dir) as a gallery (see the module docstring)."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"folder {root} does not exist or is not a directory")
    base = root / video_dir if video_dir else root
    if not base.is_dir():
        raise FileNotFoundError(f"video folder {base} does not exist or is not a directory")
    videos = list_videos(base)
    if not videos:
        raise AnnotationError(f"{base} holds no video files (looked for {', '.join(VIDEO_EXTS)} in every folder "
                              f"below it)")
    return FolderAnnotations(dataset="folder", root=base, captions=[], videos=videos)
