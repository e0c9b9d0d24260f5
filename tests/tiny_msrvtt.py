"""Write small MSRVTT-layout datasets (annotations + videos) for the extraction tests."""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path


def write_msrvtt(root: Path, train: dict[str, list[str]], test: list[tuple[str, str, str]],
                 videos: dict[str, Path | bytes | None], train_ids: list[str] | None = None) -> Path:
    """train: video_id -> captions; test: (key, video_id, sentence) rows; videos: video_id -> a file
    to copy, raw bytes to write, or None (left missing). `train_ids` overrides the train CSV rows."""
    root = Path(root)
    (root / "videos").mkdir(parents=True, exist_ok=True)
    sentences = [{"video_id": v, "caption": c, "sen_id": i}
                 for i, (v, c) in enumerate((v, c) for v, caps in train.items() for c in caps)]
    sentences += [{"video_id": v, "caption": s, "sen_id": len(sentences) + i} for i, (_, v, s) in enumerate(test)]
    ids = list(dict.fromkeys(list(train) + [v for _, v, _ in test]))
    (root / "MSRVTT_data.json").write_text(json.dumps(
        {"videos": [{"video_id": v} for v in ids], "sentences": sentences}, indent=1, ensure_ascii=False))
    with open(root / "MSRVTT_train.9k.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["video_id"])
        w.writerows([v] for v in (train_ids if train_ids is not None else list(train)))
    with open(root / "MSRVTT_JSFUSION_test.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["key", "vid_key", "video_id", "sentence"])
        w.writerows([k, f"msr{i}", v, s] for i, (k, v, s) in enumerate(test))
    for vid, src in videos.items():
        dst = root / "videos" / f"{vid}.mp4"
        if isinstance(src, bytes):
            dst.write_bytes(src)
        elif src is not None:
            shutil.copy(src, dst)
    return root


def demo_subset(demo_root: Path, root: Path, n_train: int, captions: int, n_test: int) -> Path:
    """An MSRVTT-layout set at `root` from the session's demo set: its first `n_train` training
    videos with up to `captions` captions each, and its first `n_test` test captions."""
    from diffret.extract.annotations import load_msrvtt

    ann = load_msrvtt(demo_root)
    train = {v: [c.text for c in ann.split("train") if c.video_id == v][:captions]
             for v in ann.video_ids("train")[:n_train]}
    test = [(c.caption_id, c.video_id, c.text) for c in ann.split("test")[:n_test]]
    videos = {v: ann.videos[v] for v in list(train) + [v for _, v, _ in test]}
    return write_msrvtt(root, train, test, videos)
