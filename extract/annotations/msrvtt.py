"""The MSR-VTT loader: the 9k train / 1k-A (JSFusion) test split of CLIP4Clip and DiffusionRet."""
from __future__ import annotations

from pathlib import Path

from .base import (
    AnnotationError,
    Annotations,
    Caption,
    check_unique,
    id_text_pairs,
    read_csv,
    read_json,
    require_file,
    require_root,
    video_folder,
)

MSRVTT_JSON = "MSRVTT_data.json"
MSRVTT_TRAIN_CSV = "MSRVTT_train.9k.csv"
MSRVTT_TEST_CSV = "MSRVTT_JSFUSION_test.csv"


def _msrvtt_sentences(path: Path) -> list[tuple[str, str]]:
    """(video_id, caption) of every entry of `sentences` in MSRVTT_data.json, in file order."""
    data = read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("sentences"), list):
        raise AnnotationError(f"{path}: expected a JSON object with a 'sentences' list")
    return id_text_pairs(data["sentences"], path, "video_id", "caption", "sentences[{i}]", strip_text=True)


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
    root = require_root(root, "msrvtt")
    json_path = require_file(root / MSRVTT_JSON, "msrvtt")
    train_path = require_file(root / MSRVTT_TRAIN_CSV, "msrvtt")
    test_path = require_file(root / MSRVTT_TEST_CSV, "msrvtt")

    sentences = _msrvtt_sentences(json_path)
    train_rows = read_csv(train_path, ("video_id",))
    test_rows = read_csv(test_path, ("key", "vid_key", "video_id", "sentence"))

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
    check_unique(captions, test_path)

    folder = video_folder(root, video_dir)
    videos = {vid: folder / f"{vid}.mp4" for vid in dict.fromkeys(c.video_id for c in captions)}
    return Annotations(dataset="msrvtt", root=root, captions=captions, videos=videos)
