"""Frames as the original DiffusionRet samples them, and what padded frame slots hold.

The original (DiffusionRet/dataloaders/rawvideo_util.py, video_to_tensor, with the datasets'
_get_rawvideo) truncates the frame rate to an integer, takes frames sec * fps + offset, and
subsamples with np.linspace(..., dtype=int) (floor); its padded slots are all-zero tensors after
normalisation, so they carry the CLS feature of an all-zero frame into the temporal transformer.
"""
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch

from diffret.extract.backbone import build_clip
from diffret.extract.config import TRAINING_FIELDS, ExtractConfig, default_end_second
from diffret.extract.data import video_loader
from diffret.extract.model import Stage1Model
from diffret.extract.video import FrameSpec, read_frames, sample_frame_indices

NTSC = Fraction(30000, 1001)  # 29.97 fps


def original_loader(total: int, fps: float, sample_fp: int, max_frames: int, end_time: int | None = None):
    """A transcription of the original's frame choice (video_to_tensor + _get_rawvideo, OpenCV
    reads replaced by "frame index < total"), as the reference the rule must equal."""
    fps = int(fps)
    total_duration = (total + fps - 1) // fps
    start_sec, end_sec = 0, total_duration
    if end_time is not None:
        start_sec, end_sec = 0, end_time if end_time <= total_duration else total_duration
    interval = 1
    if sample_fp > 0:
        interval = fps // sample_fp
    else:
        sample_fp = fps
    if interval == 0:
        interval = 1
    inds = [ind for ind in np.arange(0, fps, interval)][:sample_fp]
    ret, picked = True, []
    for sec in np.arange(start_sec, end_sec + 1):
        if not ret:
            break
        for ind in inds:
            ret = int(sec * fps) + ind < total
            if not ret:
                break
            picked.append(int(sec * fps) + int(ind))
    if max_frames < len(picked):
        picked = [picked[i] for i in np.linspace(0, len(picked) - 1, num=max_frames, dtype=int)]
    return picked


# --------------------------------------------------------------------------- the rule itself


def test_ntsc_clip_gives_eleven_frames_original_and_ten_exact():
    assert sample_frame_indices(300, 29.97, 12) == [29 * s for s in range(11)]  # 29.97 -> 29: 0 .. 290
    assert sample_frame_indices(300, 29.97, 12, rule="exact") == [30 * s for s in range(10)]  # 299.7 -> 300 is past


def test_floor_linspace_subsampling_by_hand():
    # 200 frames at 10 fps: 20 one-a-second candidates 0, 10, ..., 190, cut to 12:
    # linspace(0, 19, 12) = 0, 1.73, 3.45, 5.18, 6.91, 8.64, 10.36, 12.09, 13.82, 15.55, 17.27, 19
    assert sample_frame_indices(200, 10.0, 12) == [0, 10, 30, 50, 60, 80, 100, 120, 130, 150, 170, 190]  # floor
    assert sample_frame_indices(200, 10.0, 12, rule="exact") == [0, 20, 30, 50, 70, 90, 100, 120, 140, 160, 170, 190]
    # 100 s at 29.97 fps: 104 candidates 29 * s (s = 0 .. 103), cut to 12 by floor(i * 103 / 11)
    assert sample_frame_indices(3000, 29.97, 12) == [29 * (i * 103 // 11) for i in range(12)]
    # uniform (the original's framerate 0: every frame, then cut): 24 frames -> 12
    assert sample_frame_indices(24, 8.0, 12, None) == [0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 23]
    assert sample_frame_indices(24, 8.0, 12, None, rule="exact") == [0, 2, 4, 6, 8, 10, 13, 15, 17, 19, 21, 23]


@pytest.mark.parametrize("fps", [29.97, 30.0, 25.0, 23.976, 59.94, 10.0, 8.0, 1.5])
@pytest.mark.parametrize("sample_fp", [0, 1, 2, 3])
def test_original_rule_equals_the_original_loader(fps, sample_fp):
    for total in (1, 7, 29, 30, 31, 299, 300, 301, 1000, 3601):
        for n in (1, 12, 64):
            for end in (None, 1, 5, 31):
                target = None if sample_fp == 0 else float(sample_fp)
                if sample_fp > int(fps):  # the original asserts there; ours takes every frame
                    continue
                want = original_loader(total, fps, sample_fp, n, end)
                assert sample_frame_indices(total, fps, n, target, end_second=end) == want, (total, n, end)


def test_didemo_end_second_31():
    # a 60 s DiDeMo video at 29.97 fps (1798 frames): the original reads seconds 0..31 -> 32 frames
    assert sample_frame_indices(1798, 29.97, 64, end_second=31) == [29 * s for s in range(32)]
    assert len(sample_frame_indices(1798, 29.97, 64)) == 62  # the whole video: 0 .. 61 * 29
    assert len(sample_frame_indices(1798, 29.97, 64, rule="exact", end_second=31)) == 32  # seconds 0 .. 31
    assert sample_frame_indices(100, 29.97, 64, end_second=31) == [0, 29, 58, 87]  # shorter: unchanged
    assert default_end_second("didemo") == 31 and default_end_second("DiDeMo") == 31
    assert default_end_second("msrvtt") is None and default_end_second("activitynet") is None


def test_bad_rules_are_refused():
    with pytest.raises(ValueError, match="unknown frame rule"):
        sample_frame_indices(10, 10.0, 4, rule="opencv")
    with pytest.raises(ValueError, match="whole number of frames a second"):
        FrameSpec(target_fps=0.5)
    assert FrameSpec(target_fps=0.5, rule="exact").target_fps == 0.5
    with pytest.raises(ValueError, match="last second"):
        FrameSpec(end_second=-1)
    with pytest.raises(ValueError, match="unknown frame padding"):
        ExtractConfig(frame_padding="mean")
    with pytest.raises(ValueError, match="whole number of frames a second"):
        ExtractConfig(target_fps=2.5)


def test_config_defaults_are_the_original_and_decide_the_recipe():
    cfg = ExtractConfig()
    assert (cfg.frame_rule, cfg.frame_padding, cfg.end_second) == ("original", "zero-frame", None)
    assert {"frame_rule", "frame_padding", "end_second"} <= set(TRAINING_FIELDS)
    spec = FrameSpec()
    assert (spec.rule, spec.end_second) == ("original", None)


# --------------------------------------------------------------------------- end to end on a 29.97 fps file


def digits(i: int) -> list[int]:
    return [i // 100, i // 10 % 10, i % 10]


def write_ntsc(path: Path, n: int = 300, side: int = 96) -> Path:
    """n frames at 30000/1001 fps; frame i shows its index as three grey bands (16 + 24 * digit)."""
    av = pytest.importorskip("av")
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=NTSC)
        s.width, s.height, s.pix_fmt = side, side, "yuv420p"
        for i in range(n):
            img = np.zeros((side, side, 3), np.uint8)
            for b, d in enumerate(digits(i)):
                img[b * side // 3:(b + 1) * side // 3] = 16 + 24 * d
            for p in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


def frame_numbers(frames: torch.Tensor, mask: torch.Tensor) -> list[int]:
    """Read back the index drawn into each real frame (uint8 [F, 3, S, S])."""
    side = frames.shape[-1]
    out = []
    for f in frames[mask].float():
        bands = [f[:, b * side // 3 + 4:(b + 1) * side // 3 - 4].mean().item() for b in range(3)]
        d = [round((v - 16) / 24) for v in bands]
        out.append(100 * d[0] + 10 * d[1] + d[2])
    return out


@pytest.fixture(scope="module")
def ntsc(tmp_path_factory) -> Path:
    pytest.importorskip("decord")
    return write_ntsc(tmp_path_factory.mktemp("ntsc") / "ntsc.mp4")


def test_read_frames_on_a_2997_fps_video(ntsc):
    import decord

    vr = decord.VideoReader(str(ntsc), num_threads=1)
    assert len(vr) == 300 and abs(vr.get_avg_fps() - 29.97) < 1e-3
    del vr
    frames, mask = read_frames(ntsc, FrameSpec(n_frames=12, size=96))
    assert mask.tolist() == [True] * 11 + [False] and frame_numbers(frames, mask) == [29 * s for s in range(11)]
    frames, mask = read_frames(ntsc, FrameSpec(n_frames=12, size=96, rule="exact"))
    assert mask.tolist() == [True] * 10 + [False] * 2 and frame_numbers(frames, mask) == [30 * s for s in range(10)]
    frames, mask = read_frames(ntsc, FrameSpec(n_frames=12, size=96, end_second=4))
    assert frame_numbers(frames, mask) == [0, 29, 58, 87, 116]


def test_rule_reaches_the_decoding_helpers(ntsc):
    """The spec crosses the watchdog's pipe (decoder.py) and the DataLoader workers (data.py)."""
    for rule, want in (("original", [29 * s for s in range(11)]), ("exact", [30 * s for s in range(10)])):
        spec = FrameSpec(n_frames=12, size=96, rule=rule)
        frames, mask = read_frames(ntsc, spec, timeout=60)
        assert frame_numbers(frames, mask) == want
        (frames, mask, idx, reasons), = list(video_loader([ntsc], spec, batch_size=1, workers=1, timeout=60))
        assert reasons == ("",) and frame_numbers(frames[0], mask[0]) == want


# --------------------------------------------------------------------------- padded slots


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    clip = build_clip("tiny", "none")
    return Stage1Model(clip, max_frames=6).eval()


def test_padded_slots_get_the_cls_of_an_all_zero_frame(tiny):
    g = torch.Generator().manual_seed(3)
    frames = torch.randn(2, 6, 3, 32, 32, generator=g)
    mask = torch.tensor([[1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    assert tiny.frame_padding == "zero-frame"
    with torch.no_grad():
        out = tiny.encode_video(frames, mask)
        zero = tiny.clip.encode_image(torch.zeros(1, 3, 32, 32)).float()  # [1, D]
        cls = tiny.clip.encode_image(frames.flatten(0, 1)).float().view(2, 6, -1)
        cls[0, 2:] = zero  # the original: the padded slots are zero tensors fed to the image tower
        want = tiny.temporal(cls, mask)
        assert torch.allclose(out["frames"], want, atol=1e-5)
        assert torch.allclose(out["frame_logits"], tiny.video_weight_fc(want).squeeze(-1), atol=1e-5)
        junk = frames.clone()
        junk[0, 2:] = torch.randn(4, 3, 32, 32, generator=g)  # padded pixels are never encoded
        assert torch.allclose(tiny.encode_video(junk, mask)["frames"], out["frames"], atol=1e-5)


def test_zero_feature_switch_keeps_the_previous_behaviour(tiny):
    g = torch.Generator().manual_seed(4)
    frames = torch.randn(1, 6, 3, 32, 32, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0]], dtype=torch.bool)
    other = Stage1Model(tiny.clip, max_frames=6, frame_padding="zero-feature").eval()
    other.load_state_dict(tiny.state_dict())
    with torch.no_grad():
        out = other.encode_video(frames, mask)
        cls = tiny.clip.encode_image(frames.flatten(0, 1)).float().view(1, 6, -1) * mask[..., None]
        assert torch.allclose(out["frames"], other.temporal(cls, mask), atol=1e-5)
        base = tiny.encode_video(frames, mask)["frames"]
    assert torch.allclose(out["frames"][mask], base[mask], atol=1e-5)  # real frames: the same either way
    assert (out["frames"][~mask] - base[~mask]).abs().max() > 1e-3  # padded slots: not
    with pytest.raises(ValueError, match="unknown frame padding"):
        Stage1Model(tiny.clip, max_frames=6, frame_padding="mean")


def test_checkpoint_builds_carry_the_switches(tmp_path):
    from diffret.extract.checkpoint import build_stage1, fingerprint, load_stage1, save_stage1

    cfg = ExtractConfig(model="tiny", pretrained="none", frames=4, words=8, frame_rule="exact",
                        frame_padding="zero-feature", end_second=7)
    model, spec = build_stage1(cfg)
    assert model.frame_padding == "zero-feature" and (spec.rule, spec.end_second) == ("exact", 7)
    save_stage1(tmp_path / "stage1.pt", model, cfg, fingerprint(model))
    again, spec2, _, _ = load_stage1(tmp_path / "stage1.pt", ExtractConfig(model="tiny", pretrained="none", frames=4,
                                                                           words=8))
    assert again.frame_padding == "zero-frame" and (spec2.rule, spec2.end_second) == ("original", None)
    again, spec3, _, _ = load_stage1(tmp_path / "stage1.pt")  # the saved settings
    assert again.frame_padding == "zero-feature" and (spec3.rule, spec3.end_second) == ("exact", 7)


def test_cli_passes_the_switches(tmp_path, monkeypatch):
    from click.testing import CliRunner

    import diffret.extract.stage1 as stage1
    from diffret.pipeline.cli import main

    seen = {}

    def fake_run(cfg, out, **kw):
        seen["cfg"] = cfg
        return {"splits": {}, "seconds": 0, "device": "cpu", "failed": 0, "failures_file": ""}

    monkeypatch.setattr(stage1, "run_stage1", fake_run)
    base = ["extract", "--data-root", str(tmp_path), "--out", str(tmp_path / "c"), "--model", "tiny"]
    assert CliRunner().invoke(main, base + ["--dataset", "didemo"]).exit_code == 0
    assert (seen["cfg"].frame_rule, seen["cfg"].frame_padding, seen["cfg"].end_second) == ("original", "zero-frame", 31)
    assert CliRunner().invoke(main, base + ["--frame-rule", "exact", "--frame-padding", "zero-feature",
                                            "--end-second", "9"]).exit_code == 0
    assert (seen["cfg"].frame_rule, seen["cfg"].frame_padding, seen["cfg"].end_second) == ("exact", "zero-feature", 9)
    assert CliRunner().invoke(main, base + ["--dataset", "didemo", "--end-second", "none"]).exit_code == 0
    assert seen["cfg"].end_second is None
    bad = CliRunner().invoke(main, base + ["--end-second", "3.5"])
    assert bad.exit_code != 0 and "--end-second" in bad.output
    bad = CliRunner().invoke(main, base + ["--fps", "0.5"])
    assert bad.exit_code == 1 and "exact rule" in bad.output
