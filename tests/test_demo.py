"""Tests for the synthetic MSRVTT-layout demo dataset (diffret.pipeline.demo)."""
import csv
import json
from pathlib import Path

import numpy as np
import pytest

decord = pytest.importorskip("decord")

from diffret.pipeline.demo import COLOURS, DIRECTIONS, make_demo_dataset  # noqa: E402

N_TRAIN, N_TEST = 8, 4
N_FRAMES, SIZE = 24, 64
ANNOTATIONS = ("MSRVTT_data.json", "MSRVTT_train.9k.csv", "MSRVTT_JSFUSION_test.csv")


def build(root, **kw):
    calls = []
    summary = make_demo_dataset(root, n_train=N_TRAIN, n_test=N_TEST, workers=kw.pop("workers", 1),
                                progress=lambda done, total: calls.append((done, total)), **kw)
    return Path(root), summary, calls


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    base = tmp_path_factory.mktemp("demo")
    return {
        "a": build(base / "a", seed=0),
        "a_again": build(base / "a_again", seed=0, workers=2),  # worker count must not change the output
        "other_seed": build(base / "other_seed", seed=1),
        "shifted": build(base / "shifted", seed=0, shifted=True),
    }


def read_csv(path):
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


def frames(root, video_id):
    vr = decord.VideoReader(str(root / "videos" / f"{video_id}.mp4"), num_threads=1)
    return vr.get_batch(list(range(len(vr)))).asnumpy()


def test_layout_and_summary(datasets):
    root, summary, calls = datasets["a"]
    for name in ANNOTATIONS + ("demo.json",):
        assert (root / name).is_file(), name
    ids = [f"video{i}" for i in range(N_TRAIN + N_TEST)]
    assert sorted(p.stem for p in (root / "videos").glob("*.mp4")) == sorted(ids)
    data = json.loads((root / "MSRVTT_data.json").read_text())
    assert summary == {"root": str(root), "train_videos": N_TRAIN, "test_videos": N_TEST,
                       "captions": len(data["sentences"]), "seed": 0, "shifted": False}
    saved = json.loads((root / "demo.json").read_text())
    assert {k: saved[k] for k in summary} == summary and saved["params"]["frames"] == N_FRAMES
    assert calls[-1] == (N_TRAIN + N_TEST, N_TRAIN + N_TEST) and len(calls) == N_TRAIN + N_TEST


def test_annotations_parse(datasets):
    root, _, _ = datasets["a"]
    data = json.loads((root / "MSRVTT_data.json").read_text())
    videos = data["videos"]
    assert [v["video_id"] for v in videos] == [f"video{i}" for i in range(N_TRAIN + N_TEST)]
    assert [v["split"] for v in videos] == ["train"] * N_TRAIN + ["test"] * N_TEST
    for s in data["sentences"]:
        assert isinstance(s["sen_id"], int) and isinstance(s["caption"], str) and s["caption"]
    assert len({s["sen_id"] for s in data["sentences"]}) == len(data["sentences"])

    header, rows = read_csv(root / "MSRVTT_train.9k.csv")
    assert header == ["video_id"]
    assert [r["video_id"] for r in rows] == [f"video{i}" for i in range(N_TRAIN)]

    header, rows = read_csv(root / "MSRVTT_JSFUSION_test.csv")
    assert header == ["key", "vid_key", "video_id", "sentence"]
    test_ids = [f"video{i}" for i in range(N_TRAIN, N_TRAIN + N_TEST)]
    assert [r["video_id"] for r in rows] == test_ids  # exactly one row per test video
    assert [r["key"] for r in rows] == [f"ret{i}" for i in range(N_TEST)]
    assert all(r["vid_key"] == "msr" + r["video_id"][len("video"):] for r in rows)
    captions = {(s["video_id"], s["caption"]) for s in data["sentences"]}
    assert all((r["video_id"], r["sentence"]) in captions for r in rows)  # test captions are in the json too


def test_captions_per_video(datasets):
    root, _, _ = datasets["a"]
    data = json.loads((root / "MSRVTT_data.json").read_text())
    by_video = {}
    for s in data["sentences"]:
        by_video.setdefault(s["video_id"], []).append(s["caption"])
    for v in data["videos"]:
        caps = by_video[v["video_id"]]
        if v["split"] == "train":
            assert len(set(caps)) >= 2, caps
        else:
            assert len(caps) == 1
        colour = v["attributes"]["a"]["colour"]
        assert all(colour in c for c in caps), (colour, caps)


def test_videos_decode(datasets):
    root, _, _ = datasets["a"]
    for i in range(N_TRAIN + N_TEST):
        vr = decord.VideoReader(str(root / "videos" / f"video{i}.mp4"))
        assert len(vr) == N_FRAMES
        assert vr[0].shape == (SIZE, SIZE, 3)
        assert abs(vr.get_avg_fps() - 8) < 1e-6


def test_custom_size_and_duration(tmp_path):
    make_demo_dataset(tmp_path, n_train=2, n_test=1, size=32, fps=4, seconds=2.0, workers=1)
    vr = decord.VideoReader(str(tmp_path / "videos" / "video2.mp4"))
    assert len(vr) == 8 and vr[0].shape == (32, 32, 3)


def test_moving_object_matches_attributes(datasets):
    """The first object has its caption colour and moves in its caption direction (first vs last frame)."""
    root, _, _ = datasets["a"]
    data = json.loads((root / "MSRVTT_data.json").read_text())
    for v in data["videos"]:
        a = v["attributes"]["a"]
        video = frames(root, v["video_id"]).astype(int)
        centres = []
        for frame in (video[0], video[-1]):
            ys, xs = np.nonzero(np.abs(frame - np.array(COLOURS[a["colour"]])).max(axis=-1) < 60)
            assert len(xs) > 10, (v["video_id"], a)
            centres.append(np.array([xs.mean(), ys.mean()]))
        shift = centres[1] - centres[0]
        assert shift @ np.array(DIRECTIONS[a["direction"]]) > SIZE * 0.25, (v["video_id"], a, shift)


def assert_same_videos(root_a, root_b):
    """The same encoded bytes for every video, but for the encoder's rare slip: x264 gives other bytes
    for the same frames about once in 300-1,000 encodes, also within one process (pipeline/demo.py
    write_mp4), so at most one video of the set may differ, and it must decode to nearly the same frames."""
    other = [i for i in range(N_TRAIN + N_TEST)
             if (root_a / "videos" / f"video{i}.mp4").read_bytes() != (root_b / "videos" / f"video{i}.mp4").read_bytes()]
    assert len(other) <= 1, other
    for i in other:
        a, b = frames(root_a, f"video{i}").astype(int), frames(root_b, f"video{i}").astype(int)
        assert a.shape == b.shape and np.abs(a - b).mean() < 1.0, i


def test_deterministic(datasets):
    root_a, _, _ = datasets["a"]
    root_b, _, _ = datasets["a_again"]
    for name in ANNOTATIONS:
        assert (root_a / name).read_bytes() == (root_b / name).read_bytes(), name
    assert_same_videos(root_a, root_b)  # whatever the worker count or process


def test_other_seed_differs(datasets):
    root_a, _, _ = datasets["a"]
    root_c, _, _ = datasets["other_seed"]
    assert (root_a / "MSRVTT_data.json").read_bytes() != (root_c / "MSRVTT_data.json").read_bytes()
    assert not all(np.array_equal(frames(root_a, f"video{i}"), frames(root_c, f"video{i}")) for i in range(3))


def test_shifted_differs(datasets):
    root_a, _, _ = datasets["a"]
    root_s, summary, _ = datasets["shifted"]
    assert summary["shifted"] is True
    caps = lambda root: {s["caption"] for s in json.loads((root / "MSRVTT_data.json").read_text())["sentences"]}  # noqa: E731
    assert caps(root_a).isdisjoint(caps(root_s))  # new phrasings
    # same seed, so same attributes; only the rendering and the wording change
    videos = lambda root: [v["attributes"] for v in json.loads((root / "MSRVTT_data.json").read_text())["videos"]]  # noqa: E731
    assert videos(root_a) == videos(root_s)
    for i in range(N_TRAIN + N_TEST):  # backgrounds differ (mean over the whole first frame)
        fa, fs = frames(root_a, f"video{i}")[0].astype(int), frames(root_s, f"video{i}")[0].astype(int)
        assert np.abs(fa - fs).mean() > 10, i


def test_same_bytes_after_open_clip_is_imported(datasets, tmp_path):
    """Rendering happens in fresh processes, so what this process has loaded cannot change it."""
    import open_clip  # noqa: F401  (rendered in this process after it, the bytes differed)

    root_a, _, _ = datasets["a"]
    root, _, _ = build(tmp_path / "again", seed=0)
    assert_same_videos(root_a, root)
