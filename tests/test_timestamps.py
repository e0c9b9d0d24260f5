"""Honest timestamps: every sampled frame's decoded time is recorded in the cache (frame_times),
and `--frame-rule timestamps` samples variable-frame-rate videos by decoded time, not by index."""
from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from conftest import run_cli
from diffret.cache.store import CacheReader
from diffret.cache.verify import verify_cache
from diffret.extract.config import ExtractConfig
from diffret.extract.video import FrameSpec, decode_pyav_timed, read_frames_timed, sample_by_time
from test_frame_rule import digits, frame_numbers

# 10 frames: 5 in the first 0.05 s, then one every 0.6 s up to 3 s (decord's average rate: 3.2 fps)
PTS_MS = [0, 10, 20, 30, 40, 600, 1200, 1800, 2400, 3000]


def write_vfr(path: Path, side: int = 96) -> Path:
    """A variable-frame-rate H.264 file: frame i has pts PTS_MS[i] ms and shows i (see test_frame_rule)."""
    av = pytest.importorskip("av")
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=10)
        s.width, s.height, s.pix_fmt = side, side, "yuv420p"
        s.codec_context.time_base = s.time_base = Fraction(1, 1000)
        s.options = {"bf": "0"}
        for i, ms in enumerate(PTS_MS):
            img = np.zeros((side, side, 3), np.uint8)
            for b, d in enumerate(digits(i)):
                img[b * side // 3:(b + 1) * side // 3] = 16 + 24 * d
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            frame.pts, frame.time_base = ms, Fraction(1, 1000)
            for p in s.encode(frame):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


def pyav_times(path: Path) -> list[float]:
    import av

    with av.open(str(path)) as c:
        return [float(f.pts * f.time_base) for f in c.decode(c.streams.video[0])]


@pytest.fixture(scope="module")
def vfr(tmp_path_factory) -> Path:
    pytest.importorskip("decord")
    path = write_vfr(tmp_path_factory.mktemp("vfr") / "vfr.mp4")
    assert pyav_times(path) == pytest.approx([ms / 1000 for ms in PTS_MS])
    return path


def test_recorded_times_are_the_decoded_pts(vfr):
    pts = np.array(pyav_times(vfr), np.float32)
    for rule in ("original", "exact", "timestamps"):
        for fps in (1.0, None):
            spec = FrameSpec(n_frames=6, size=48, target_fps=fps, rule=rule)
            for timeout in (None, 60):  # in-process, and across the watchdog helper's pipe
                frames, mask, times = read_frames_timed(vfr, spec, timeout=timeout)
                picked = frame_numbers(frames, mask)
                assert times.dtype.is_floating_point and times.shape == (6,)
                np.testing.assert_allclose(times[mask].numpy(), pts[picked], atol=1e-4)
                assert (times[~mask] == -1).all()
    arr, times = decode_pyav_timed(vfr, [0, 4, 9])  # the PyAV fallback records pts * time_base too
    assert arr.shape[0] == 3 and times.tolist() == pytest.approx([0.0, 0.04, 3.0])


def test_timestamp_sampling_spreads_frames_where_the_index_rule_does_not(vfr):
    for fps in (1.0, None):
        frames, mask, times = read_frames_timed(vfr, FrameSpec(n_frames=4, size=48, target_fps=fps))
        assert frame_numbers(frames, mask) == [0, 3, 6, 9]  # by index at the average rate: 0 s and 0.03 s
        assert np.diff(times[mask].numpy()).min() < 0.05
        frames, mask, times = read_frames_timed(vfr, FrameSpec(n_frames=4, size=48, target_fps=fps, rule="timestamps"))
        assert frame_numbers(frames, mask) == [0, 6, 7, 9]  # nearest 0, 1, 2, 3 s: 0, 1.2, 1.8, 3.0
        assert np.diff(times[mask].numpy()).min() > 0.5


def test_sample_by_time_rules():
    t = np.array(PTS_MS) / 1000
    assert sample_by_time(t, 12) == [0, 6, 7, 9]
    assert sample_by_time(t, 12, target_fps=2.0) == [0, 5, 6, 7, 8, 9]  # 0, .5, 1, 1.5, ... 3 s
    assert sample_by_time(t, 3, target_fps=2.0) == [0, 6, 9]  # 7 targets, 3 kept: 0, 1.5 (tie 1.2/1.8: the earlier), 3 s
    assert sample_by_time(t, 12, end_second=1) == [0, 6]  # targets 0 and 1 s only
    assert sample_by_time(t, 3, target_fps=None) == [0, 6, 9]  # uniform: 0, 1.5, 3 s (tie: the earlier)
    assert sample_by_time([0.5], 4) == [0]
    with pytest.raises(ValueError, match="non-finite"):
        sample_by_time([0.0, float("nan")], 4)
    cfg = ExtractConfig(frame_rule="timestamps", target_fps=0.5)  # any rate, as the exact rule
    assert cfg.frame_rule == "timestamps"
    with pytest.raises(ValueError, match="unknown frame rule"):
        ExtractConfig(frame_rule="pts")


def test_cache_round_trips_frame_times(vfr, tmp_path):
    rows = ["video,caption,split,video_id"]
    for split in ("train", "test"):
        for k in range(2):
            rows.append(f"{vfr},a clip of bands {k},{split},{split}{k}")
    (tmp_path / "manifest.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "cache"
    run_cli("extract", "--dataset", "manifest", "--data-root", tmp_path / "manifest.csv", "--out", out,
            "--model", "tiny", "--pretrained", "none", "--epochs", "0", "--frames", "6", "--words", "8",
            "--workers", "0", "--frame-rule", "timestamps")
    pts = np.array(pyav_times(vfr), np.float32)
    cache = CacheReader(out)
    for split in ("train", "test"):
        v = cache.video(split)
        assert v.frame_times.dtype == np.float32 and v.frame_times.shape == (2, 6)
        assert v.frame_mask.sum(1).tolist() == [4, 4]
        np.testing.assert_allclose(v.frame_times[:, :4], np.tile(pts[[0, 6, 7, 9]], (2, 1)), atol=1e-4)
        assert (v.frame_times[:, 4:] == -1).all()
    verify_cache(out)
