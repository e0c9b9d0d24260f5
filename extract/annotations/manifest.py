"""The generic manifest: users' own videos and captions in one CSV or JSON-lines file.

    video,caption,split                       {"video": "clips/a.mp4", "caption": "...", "split": "train"}
    clips/a.mp4,a dog runs on a beach,train   one JSON object per line (.jsonl)
    clips/a.mp4,a dog on the sand,train       one row per caption: a video may have several
    /data/b.mkv,a man cooks pasta,test

Columns: `video` (also accepted: `path`, `video_path`), `caption` (or `text`, `sentence`),
`split` (train | val | test); optional `video_id` (default: the video path as written) and
`caption_id` (default f"{video_id}#{n}", n counting that video's captions). Relative video paths
are taken from --video-dir if given, else from the manifest's own folder. `--data-root` names the
file, or a folder holding exactly one `manifest.csv` or `manifest.jsonl`.
"""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from .base import SPLITS, AnnotationError, Annotations, Caption, check_unique

MANIFEST_NAMES = ("manifest.csv", "manifest.jsonl")
ALIASES = {
    "video": ("video", "path", "video_path"),
    "caption": ("caption", "text", "sentence"),
    "split": ("split",),
    "video_id": ("video_id",),
    "caption_id": ("caption_id",),
}
REQUIRED = ("video", "caption", "split")


def _manifest_file(root: Path) -> Path:
    if root.is_file():
        return root
    if not root.is_dir():
        raise FileNotFoundError(f"manifest {root} does not exist")
    found = [root / n for n in MANIFEST_NAMES if (root / n).is_file()]
    if len(found) != 1:
        raise FileNotFoundError(
            f"{root} must hold exactly one of {', '.join(MANIFEST_NAMES)} (found {len(found)}); "
            f"or pass the manifest file itself as --data-root"
        )
    return found[0]


def _canonical(record: dict, path: Path, line: int) -> dict[str, str]:
    """Map a row's keys through ALIASES; check the required ones are present and non-empty."""
    out: dict[str, str] = {}
    for key, names in ALIASES.items():
        present = [n for n in names if n in record and record[n] is not None]
        if len(present) > 1:
            raise AnnotationError(f"{path} line {line}: both {present[0]!r} and {present[1]!r} given; keep one")
        if present:
            value = record[present[0]]
            if not isinstance(value, (str, int)):
                raise AnnotationError(f"{path} line {line}: {present[0]!r} must be a string")
            out[key] = str(value).strip()
    missing = [k for k in REQUIRED if not out.get(k)]
    if missing:
        names = " / ".join(ALIASES[missing[0]])
        raise AnnotationError(f"{path} line {line}: missing or empty {names}")
    split = out["split"].lower()
    if split not in SPLITS:
        raise AnnotationError(f"{path} line {line}: split {out['split']!r} is not one of {', '.join(SPLITS)}")
    out["split"] = split
    return out


def _rows(path: Path) -> list[tuple[int, dict[str, str]]]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise AnnotationError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    rows = []
    if path.suffix.lower() in (".jsonl", ".ndjson", ".json"):
        for line, raw in enumerate(text.splitlines(), 1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except json.JSONDecodeError as e:
                raise AnnotationError(f"{path} line {line}: invalid JSON: {e.msg}") from None
            if not isinstance(record, dict):
                raise AnnotationError(f"{path} line {line}: expected one JSON object per line")
            rows.append((line, _canonical(record, path, line)))
        return rows
    try:
        reader = csv.DictReader(io.StringIO(text, newline=""))
        header = [h.strip() for h in (reader.fieldnames or [])]
        if not header:
            raise AnnotationError(f"{path} line 1: empty file, expected a header with video, caption, split")
        reader.fieldnames = header
        for key in REQUIRED:
            if not any(n in header for n in ALIASES[key]):
                raise AnnotationError(f"{path} line 1: missing column {' / '.join(ALIASES[key])} (header: {', '.join(header)})")
        for record in reader:
            if not any((v or "").strip() for k, v in record.items() if k is not None and isinstance(v, str)):
                continue
            record = {k: v for k, v in record.items() if k is not None and v not in (None, "")}
            rows.append((reader.line_num, _canonical(record, path, reader.line_num)))
    except csv.Error as e:
        raise AnnotationError(f"{path}: malformed CSV: {e}") from None
    return rows


def load_manifest(root: Path, video_dir: str | None = None) -> Annotations:
    """Captions and videos of a CSV / JSONL manifest (see the module docstring)."""
    path = _manifest_file(Path(root).expanduser())
    base = path.parent if video_dir is None else path.parent / video_dir
    captions, videos, count = [], {}, {}
    for line, row in _rows(path):
        vid = row.get("video_id") or row["video"]
        file = base / row["video"]  # an absolute video path replaces base
        if videos.setdefault(vid, file) != file:
            raise AnnotationError(f"{path} line {line}: video id {vid!r} names two files: {videos[vid]} and {file}")
        n = count.get(vid, 0)
        count[vid] = n + 1
        captions.append(Caption(row.get("caption_id") or f"{vid}#{n}", vid, row["caption"], row["split"]))
    if not captions:
        raise AnnotationError(f"{path}: no captions")
    check_unique(captions, path)
    split_of: dict[str, str] = {}
    for c in captions:
        if split_of.setdefault(c.video_id, c.split) != c.split:
            raise AnnotationError(f"{path}: video {c.video_id!r} has captions in both {split_of[c.video_id]} and {c.split}")
    return Annotations(dataset="manifest", root=path.parent, captions=captions, videos=videos)
