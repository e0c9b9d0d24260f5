"""Bad input during extraction: every kind of unreadable video is recorded in failures.parquet and
skipped, a decoder that hangs is stopped, odd captions are kept, and a malformed annotation
file stops the run before any work, naming the file and the line."""
from __future__ import annotations

import re
import struct
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import run_cli
from diffret.cache.store import CacheReader
from diffret.cache.verify import verify_cache
from diffret.extract.annotations import load_msrvtt
from tiny_msrvtt import write_msrvtt

av = pytest.importorskip("av")

FLAGS = ["--model", "tiny", "--pretrained", "none", "--epochs", "1", "--batch-size", "8", "--lr", "1e-3",
         "--frames", "4", "--words", "16", "--fps", "1", "--workers", "1", "--decode-timeout", "10"]
# (10 s: a real decode of these clips takes milliseconds, even forked and under load; the hang never ends)
LONG = " ".join(["a very long caption about a red square moving left"] * 300)


def encode(path: Path, n: int, fmt=None, codec="libx264", options=None) -> bytes:
    """n frames of noise at 10 fps (3 s for n = 30); returns the file's bytes."""
    rng = np.random.default_rng(n)
    with av.open(str(path), "w", format=fmt, options=options or {}) as c:
        s = c.add_stream(codec, rate=10)
        s.width, s.height, s.pix_fmt = 64, 48, "yuv420p"
        for _ in range(n):
            for p in s.encode(av.VideoFrame.from_ndarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8), "rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path.read_bytes()


def lying_avi(tmp: Path) -> bytes:
    """A 30-frame AVI whose headers claim 100,000 frames."""
    b = bytearray(encode(tmp / "a.avi", 30, codec="mpeg4"))
    struct.pack_into("<I", b, b.find(b"avih") + 8 + 16, 100_000)  # avih.dwTotalFrames
    struct.pack_into("<I", b, b.find(b"strh") + 8 + 32, 100_000)  # strh.dwLength
    return bytes(b)


@pytest.fixture(scope="module")
def bad_set(demo_root, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("bad")
    ann = load_msrvtt(demo_root)
    src = [ann.videos[v] for v in ann.video_ids("train")[:7]]
    mp4 = src[0].read_bytes()
    fast = encode(tmp / "fast.mp4", 30, options={"movflags": "faststart"})
    videos = {f"good{i}": src[i] for i in range(6)} | {
        "zero_byte": b"", "not_a_video": b"hello, this is not a video\n" * 20, "truncated": mp4[: len(mp4) // 2],
        "random_bytes": np.random.default_rng(0).integers(0, 256, 8192, dtype=np.uint8).tobytes(),
        "header_only": fast[: fast.find(b"mdat") + 4], "missing": None,
        "one_frame": encode(tmp / "one.mp4", 1), "lying": lying_avi(tmp), "hang": src[6],
    }
    train = {"good0": ["", "unicode is fine: café, naïve, 日本語"], "good1": [LONG], "good2": ["a blue circle"],
             "good3": ["a green star"]}
    train |= {v: [f"caption of {v}"] for v in ("zero_byte", "not_a_video", "truncated", "random_bytes",
                                                 "header_only", "missing")}
    test = [(f"k{i}", v, f"test caption of {v}") for i, v in enumerate(["good4", "good5", "one_frame", "lying", "hang"])]
    return write_msrvtt(tmp / "data", train, test, videos, train_ids=list(train) + ["good0"])  # good0 listed twice


@pytest.mark.slow
def test_bad_videos_and_captions(bad_set, tmp_path, monkeypatch):
    import diffret.extract.video as video_mod

    real = video_mod.decode_uint8

    def hangs(path, spec):  # runs in the decoding child process, which the worker kills after 10 s
        if Path(path).stem == "hang":
            time.sleep(600)
        return real(path, spec)

    monkeypatch.setattr(video_mod, "decode_uint8", hangs)
    out = tmp_path / "cache"
    r = run_cli("extract", "--data-root", bad_set, "--out", out, *FLAGS)
    squeezed = "".join(r.output.split())  # rich wraps long lines anywhere
    summary = f"7 videos could not be read and are not in the cache; the list with reasons: {out / 'failures.parquet'}"
    assert "".join(summary.split()) in squeezed, r.output

    failures = {f["video_id"]: f for f in pq.read_table(out / "failures.parquet").to_pylist()}
    expected = {"zero_byte": "empty file (0 bytes)", "not_a_video": "cannot ", "truncated": "cannot open",
                "random_bytes": "cannot open", "header_only": "cannot open: no decodable video stream",
                "missing": "file not found", "hang": "decoding took longer than 10 s"}
    assert set(failures) == set(expected)
    for vid, reason in expected.items():
        f = failures[vid]
        assert f["reason"].startswith(reason) and "\n" not in f["reason"] and len(f["reason"]) <= 200, f
        assert f["path"] == str(bad_set / "videos" / f"{vid}.mp4")

    cache = CacheReader(out)
    train, test = cache.video("train"), cache.video("test")
    assert train.video_id == ["good0", "good1", "good2", "good3"]  # once each, though listed twice
    assert test.video_id == ["good4", "good5", "one_frame", "lying"]
    # 3 s clips at 1 fps fill 3 of 4 slots: padded and masked; the one-frame video has one; the
    # AVI that claims 100,000 frames is read for what it holds (30 frames, 3 s)
    assert train.frame_mask.tolist() == [[True, True, True, False]] * 4
    assert test.frame_mask.sum(1).tolist() == [3, 3, 1, 3]
    assert np.isfinite(train.frames.astype(np.float32)).all() and np.isfinite(test.frames.astype(np.float32)).all()

    caps = cache.text("train")
    assert caps.caption == ["", "unicode is fine: café, naïve, 日本語", LONG, "a blue circle", "a green star"]
    n_words = dict(zip(caps.caption, caps.word_mask.sum(1).tolist()))
    assert n_words[""] == 2 and n_words[LONG] == 16  # [SOS][EOT]; [SOS] + 14 tokens + [EOT]
    assert cache.text("test").video_id == ["good4", "good5", "one_frame", "lying"]
    verify_cache(out)


def test_decode_watchdog_stops_a_hang_and_survives_a_crash(demo_root, monkeypatch):
    import os
    import signal

    import diffret.extract.video as video_mod
    from diffret.extract.decoder import stop_helper
    from diffret.extract.video import FrameSpec, VideoDecodeError, read_frames

    paths = sorted((demo_root / "videos").glob("*.mp4"))[:4]
    spec = FrameSpec(n_frames=4, size=16, target_fps=None)
    expected = [read_frames(p, spec)[0] for p in paths]  # in-process, no watchdog
    real = video_mod.decode_uint8

    def odd(path, spec):
        if path == paths[1]:
            time.sleep(600)
        if path == paths[2]:
            os.kill(os.getpid(), signal.SIGSEGV)
        return real(path, spec)

    stop_helper()  # the next helper is forked after the patch, so it decodes with `odd`
    monkeypatch.setattr(video_mod, "decode_uint8", odd)
    reasons = []
    for p, exp in zip(paths, expected):
        try:
            # the short bound only where the decoder hangs: a real decode in a freshly forked helper
            # on a loaded machine can take longer than 1 s
            frames, mask = read_frames(p, spec, timeout=1.0 if p == paths[1] else 120)
            assert mask.all() and (frames == exp).all()
            reasons.append("ok")
        except VideoDecodeError as e:
            reasons.append(e.reason)
    assert reasons == ["ok", "decoding took longer than 1 s (stopped; the file may be damaged)",
                       "the decoder crashed (signal SIGSEGV)", "ok"]
    stop_helper()


GOOD = {"train": {"v0": ["a red square"], "v1": ["a blue circle"]}, "test": [("k0", "v0", "a red square")]}


def _json_syntax(root):
    (root / "MSRVTT_data.json").write_text('{\n "videos": [],\n "sentences": [,]\n}\n')


def _replace_line(root, name, line, new: bytes):
    lines = (root / name).read_bytes().splitlines(keepends=True)
    lines[line - 1] = new
    (root / name).write_bytes(b"".join(lines))


@pytest.mark.parametrize("damage, where", [
    (_json_syntax, r"MSRVTT_data.json line 3 column \d+: invalid JSON"),
    (lambda r: _replace_line(r, "MSRVTT_JSFUSION_test.csv", 2, b"k0,msr0,v0,a caf\xe9 au lait\n"),
     r"MSRVTT_JSFUSION_test.csv line 2: not UTF-8 text"),
    (lambda r: (r / "MSRVTT_data.json").write_bytes((r / "MSRVTT_data.json").read_bytes().replace(b"blue", b"bl\xffe")),
     r"MSRVTT_data.json line \d+: not UTF-8 text"),
    (lambda r: (r / "MSRVTT_JSFUSION_test.csv").write_text("key,vid_key,video_id,sentence\nk0,m,v0,one\nk0,m,v1,two\n"),
     r"MSRVTT_JSFUSION_test.csv line 3: duplicate caption id 'k0' \(key also on line 2\)"),
    (lambda r: _replace_line(r, "MSRVTT_JSFUSION_test.csv", 2, b"k0,msr0,v0,\n"),
     r"MSRVTT_JSFUSION_test.csv line 2: empty or missing value for sentence"),
    (lambda r: _replace_line(r, "MSRVTT_train.9k.csv", 3, b"v7\n"),
     r"MSRVTT_train.9k.csv line 3: video 'v7' has no captions"),
])
def test_malformed_annotations_stop_before_any_work(tmp_path, damage, where):
    root = write_msrvtt(tmp_path / "data", GOOD["train"], GOOD["test"], {})
    damage(root)
    r = run_cli("extract", "--data-root", root, "--out", tmp_path / "out", *FLAGS, ok=False)
    errors = [line for line in r.output.splitlines() if line.startswith("Error:")]
    assert r.exit_code == 1 and len(errors) == 1 and len(r.output.strip().splitlines()) == 1, r.output
    assert re.search(where, errors[0]), errors[0]
    assert str(root) in errors[0]
    assert not (tmp_path / "out").exists()
