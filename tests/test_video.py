"""Frame sampling, decoding and preprocessing on tiny synthetic mp4s written with PyAV."""
from pathlib import Path

import numpy as np
import pytest
import torch

from diffret.extract.video import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    FrameSpec,
    VideoDecodeError,
    normalize,
    decode_pyav,
    read_frames,
    resize_center_crop,
    sample_frame_indices,
)

av = pytest.importorskip("av")
pytest.importorskip("decord")

N, FPS = 20, 10
TOL = 4  # libx264 (default crf) on flat grey frames stays within a couple of levels


def grey(i: int) -> int:
    """The grey level of frame i of the grey test video: distinct, 12 levels apart."""
    return 10 + 12 * i


def write_mp4(path: Path, frames: list[np.ndarray], fps: int = FPS) -> Path:
    """Encode RGB uint8 [H, W, 3] frames as H.264 yuv420p."""
    h, w = frames[0].shape[:2]
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=fps)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        for img in frames:
            for p in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


def stripes(h: int, w: int, vertical: bool) -> np.ndarray:
    """Three equal red/green/blue stripes along the long side."""
    img = np.zeros((h, w, 3), np.uint8)
    n = w if vertical else h
    for k, color in enumerate([(200, 30, 30), (30, 200, 30), (30, 30, 200)]):
        sl = slice(k * n // 3, (k + 1) * n // 3)
        if vertical:
            img[:, sl] = color
        else:
            img[sl, :] = color
    return img


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("videos")
    out = {
        "grey": write_mp4(d / "grey.mp4", [np.full((48, 64, 3), grey(i), np.uint8) for i in range(N)]),
        "wide": write_mp4(d / "wide.mp4", [stripes(48, 96, vertical=True)] * 4),
        "tall": write_mp4(d / "tall.mp4", [stripes(96, 48, vertical=False)] * 4),
        # width 48 trips decord 0.6's alignment bug (dmlc/decord#336): the PyAV fallback decodes it
        "narrow": write_mp4(d / "narrow.mp4", [np.full((32, 48, 3), grey(i), np.uint8) for i in range(N)]),
    }
    (d / "empty.mp4").write_bytes(b"")
    (d / "random.mp4").write_bytes(np.random.default_rng(0).integers(0, 256, 8192, dtype=np.uint8).tobytes())
    (d / "notes.txt").write_text("hello, this is not a video\n" * 10)
    (d / "notes.mp4").write_text("hello, this is not a video\n" * 10)
    out.update({k: d / k for k in ("empty.mp4", "random.mp4", "notes.txt", "notes.mp4")})
    out["missing"] = d / "missing.mp4"
    return out


# --------------------------------------------------------------------------- sampling rules


def test_one_fps_rule_short_video_gives_fewer_frames():
    idx = sample_frame_indices(100, 10.0, 12, target_fps=1.0)
    assert idx == [0, 10, 20, 30, 40, 50, 60, 70, 80, 90]  # 10 s -> 10 frames, 2 slots padded


@pytest.mark.parametrize("rule, cut", [("original", np.floor), ("exact", np.rint)])
def test_one_fps_rule_long_video_subsamples_uniformly(rule, cut):
    idx = sample_frame_indices(1000, 10.0, 12, target_fps=1.0, rule=rule)  # 100 one-per-second candidates
    assert len(idx) == 12 and idx[0] == 0 and idx[-1] == 990
    assert all(i % 10 == 0 for i in idx) and idx == sorted(set(idx))
    cand = np.arange(0, 1000, 10)
    assert idx == cand[cut(np.linspace(0, 99, 12)).astype(int)].tolist()
    idx = sample_frame_indices(1000, 10.0, 7, target_fps=1.0, rule=rule)  # linspace(0, 99, 7) is not whole
    assert idx == cand[cut(np.linspace(0, 99, 7)).astype(int)].tolist()


@pytest.mark.parametrize("rule", ["original", "exact"])
def test_one_fps_rule_fractional_fps_and_other_rates(rule):
    idx = sample_frame_indices(300, 29.97, 12, target_fps=1.0, rule=rule)  # ~10 s of NTSC video
    if rule == "exact":  # the float rate: frames round(i * 29.97)
        assert idx == [round(i * 29.97) for i in range(11) if round(i * 29.97) < 300]
    else:  # the original's integer rate 29 (see test_frame_rule.py)
        assert idx == [29 * i for i in range(11)]
    assert sample_frame_indices(30, 10.0, 12, target_fps=2.0, rule=rule) == [0, 5, 10, 15, 20, 25]
    assert sample_frame_indices(5, 10.0, 12, target_fps=1.0, rule=rule) == [0]  # < 1 s: one frame
    # target above the native rate: every frame once, never repeats
    assert sample_frame_indices(6, 10.0, 12, target_fps=25.0, rule=rule) == [0, 1, 2, 3, 4, 5]


@pytest.mark.parametrize("rule, cut", [("original", np.floor), ("exact", np.rint)])
def test_uniform_rule(rule, cut):
    want = cut(np.linspace(0, 19, 12)).astype(int).tolist()
    assert sample_frame_indices(20, 10.0, 12, target_fps=None, rule=rule) == want
    idx = sample_frame_indices(24, 8.0, 12, target_fps=None, rule=rule)  # the 3 s demo clips at 8 fps
    assert len(idx) == 12 and idx[0] == 0 and idx[-1] == 23
    assert sample_frame_indices(5, 8.0, 12, target_fps=None, rule=rule) == [0, 1, 2, 3, 4]  # total < n
    assert sample_frame_indices(1, 8.0, 12, target_fps=None, rule=rule) == [0]
    assert sample_frame_indices(50, 0.0, 1, target_fps=None, rule=rule) == [0]  # fps ignored


def test_sampling_rejects_bad_arguments():
    with pytest.raises(ValueError):
        sample_frame_indices(0, 10.0, 12)
    with pytest.raises(ValueError):
        sample_frame_indices(10, 10.0, 0)
    with pytest.raises(ValueError):
        sample_frame_indices(10, 0.0, 12, target_fps=1.0)


# --------------------------------------------------------------------------- read_frames


def test_read_frames_uniform_picks_the_right_frames(videos):
    spec = FrameSpec(n_frames=12, size=32, target_fps=None)
    frames, mask = read_frames(videos["grey"], spec)
    assert frames.shape == (12, 3, 32, 32) and frames.dtype == torch.uint8
    assert mask.dtype == torch.bool and mask.all()
    want = [grey(i) for i in sample_frame_indices(N, FPS, 12, None)]
    got = frames.float().mean(dim=(1, 2, 3))
    assert torch.allclose(got, torch.tensor(want, dtype=torch.float32), atol=TOL), (got, want)
    assert (frames.float() - got.view(-1, 1, 1, 1)).abs().max() <= TOL  # flat frames stay flat


def test_read_frames_one_fps_pads_and_masks(videos):
    frames, mask = read_frames(videos["grey"], FrameSpec(n_frames=12, size=32, target_fps=1.0))
    assert frames.shape == (12, 3, 32, 32)
    assert mask.tolist() == [True, True] + [False] * 10  # 2 s at 1 fps: frames 0 and 10
    assert abs(frames[0].float().mean() - grey(0)) <= TOL
    assert abs(frames[1].float().mean() - grey(10)) <= TOL
    assert (frames[2:] == 0).all()


def test_read_frames_more_slots_than_frames(videos):
    frames, mask = read_frames(str(videos["grey"]), FrameSpec(n_frames=24, size=16, target_fps=None))
    assert mask.sum() == N and mask[:N].all() and not mask[N:].any()
    got = frames[:N].float().mean(dim=(1, 2, 3))
    assert torch.allclose(got, torch.tensor([float(grey(i)) for i in range(N)]), atol=TOL)
    assert (frames[N:] == 0).all()


@pytest.mark.parametrize("name", ["wide", "tall"])
def test_resize_shortest_side_and_centre_crop(videos, name):
    # 48x96 (or 96x48) stripes red|green|blue along the long side; shortest side 48 -> 32 makes
    # the long side 64 and the centre 32x32 crop covers original 24..72: green, red/blue edges
    frames, mask = read_frames(videos[name], FrameSpec(n_frames=2, size=32, target_fps=None))
    assert frames.shape == (2, 3, 32, 32) and mask.all()
    f = frames[0].float()
    along = (lambda j: f[:, :, j]) if name == "wide" else (lambda j: f[:, j, :])
    centre, first, last = along(16).mean(1), along(0).mean(1), along(31).mean(1)
    assert centre.argmax() == 1 and centre[1] > 170  # green in the middle
    assert first.argmax() == 0 and last.argmax() == 2  # red edge first, blue edge last


def test_resize_center_crop_matches_torchvision_and_pil():
    tvf = pytest.importorskip("torchvision.transforms.functional")
    Image = pytest.importorskip("PIL.Image")
    rng = np.random.default_rng(1)
    img = (rng.random((2, 3, 37, 70)) * 255).astype(np.uint8)
    img = torch.from_numpy(img)
    out = resize_center_crop(img, 24)
    ref = tvf.center_crop(
        tvf.resize(img, 24, interpolation=tvf.InterpolationMode.BICUBIC, antialias=True), [24, 24]
    )
    assert out.shape == ref.shape == (2, 3, 24, 24)
    # same geometry; torchvision resizes uint8 tensors in float32 for bicubic (overshoot clamped)
    assert (out.int() - ref.int()).abs().float().mean() < 0.5
    for i in range(2):  # CLIP's PIL preprocessing: torch's uint8 kernel follows PIL's fixed point
        pil = Image.fromarray(img[i].permute(1, 2, 0).numpy())
        pil_ref = tvf.pil_to_tensor(tvf.center_crop(tvf.resize(pil, 24, interpolation=tvf.InterpolationMode.BICUBIC), [24, 24]))
        diff = (out[i].int() - pil_ref.int()).abs()
        assert diff.max() <= 1 and diff.float().mean() < 0.05


def test_resize_skipped_when_shortest_side_already_fits():
    img = torch.arange(2 * 3 * 32 * 40, dtype=torch.int64).remainder(256).to(torch.uint8).view(2, 3, 32, 40)
    assert torch.equal(resize_center_crop(img, 32), img[..., :, 4:36])


def test_pyav_fallback_for_decord_width_bug(videos):
    import decord

    vr = decord.VideoReader(str(videos["narrow"]), num_threads=1)
    try:
        vr.get_batch([0, 1])
        message = ""
    except Exception as e:
        message = str(e)
    del vr  # never leave a reader to the garbage collector of a forked DataLoader worker
    if "from_size == to_size" not in message:
        pytest.skip("this decord build no longer has the width-alignment bug")
    frames, mask = read_frames(videos["narrow"], FrameSpec(n_frames=5, size=32, target_fps=None))
    assert frames.shape == (5, 3, 32, 32) and mask.all()
    want = torch.tensor([float(grey(i)) for i in sample_frame_indices(N, FPS, 5, None)])
    assert torch.allclose(frames.float().mean(dim=(1, 2, 3)), want, atol=TOL)


def test_pyav_fallback_matches_decord(videos):
    import decord

    idx = [0, 3, 11, 19]
    ref = decord.VideoReader(str(videos["grey"]), num_threads=1).get_batch(idx).asnumpy()
    alt = decode_pyav(videos["grey"], idx)
    assert alt.shape == ref.shape and alt.dtype == np.uint8
    assert np.abs(alt.astype(int) - ref.astype(int)).max() <= 1
    assert decode_pyav(videos["grey"], [0, N]) is None  # past the end
    assert decode_pyav(videos["notes.mp4"], [0]) is None


# --------------------------------------------------------------------------- failures


@pytest.mark.parametrize(
    "name, reason",
    [
        ("missing", "file not found"),
        ("empty.mp4", "empty file"),
        ("random.mp4", "cannot open"),
        ("notes.mp4", "cannot open"),
        ("notes.txt", "cannot "),  # ffmpeg's tty demuxer opens text; decoding then fails
    ],
)
def test_decode_errors(videos, name, reason):
    with pytest.raises(VideoDecodeError) as e:
        read_frames(videos[name], FrameSpec(n_frames=4, size=16))
    assert e.value.reason.startswith(reason)
    assert "\n" not in str(e.value) and str(videos[name]) in str(e.value)
    assert isinstance(e.value, RuntimeError)
    # the traceback must not keep a decord reader (and its thread) alive: see read_frames
    tb, held = e.value.__traceback__, []
    while tb is not None:
        held += [v for v in tb.tb_frame.f_locals.values() if type(v).__name__ == "VideoReader"]
        tb = tb.tb_next
    assert held == []


# --------------------------------------------------------------------------- normalize / spec


def test_normalize():
    x = torch.tensor([0, 255], dtype=torch.uint8).view(2, 1, 1, 1).expand(2, 3, 2, 2)
    y = normalize(x.unsqueeze(0), OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)  # [1, 2, 3, 2, 2]
    assert y.shape == (1, 2, 3, 2, 2) and y.dtype == torch.float32
    mean, std = torch.tensor(OPENAI_CLIP_MEAN), torch.tensor(OPENAI_CLIP_STD)
    assert torch.allclose(y[0, 0, :, 0, 0], -mean / std)
    assert torch.allclose(y[0, 1, :, 1, 1], (1 - mean) / std)
    with pytest.raises(ValueError):
        normalize(torch.zeros(2, 4, 4, dtype=torch.uint8), OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)


def test_frame_spec_defaults_and_validation():
    spec = FrameSpec()
    assert (spec.n_frames, spec.size, spec.target_fps, spec.rule, spec.end_second) == (12, 224, 1.0, "original", None)
    assert spec.mean == (0.48145466, 0.4578275, 0.40821073)
    assert spec.std == (0.26862954, 0.26130258, 0.27577711)
    for bad in (dict(n_frames=0), dict(size=0), dict(target_fps=0.0), dict(rule="cv2"), dict(target_fps=1.5),
                dict(end_second=2.5)):
        with pytest.raises(ValueError):
            FrameSpec(**bad)


class _Clips(torch.utils.data.Dataset):
    def __init__(self, paths, spec):
        self.paths, self.spec = paths, spec

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        return read_frames(self.paths[i], self.spec)


def test_read_frames_in_dataloader_workers(videos):
    spec = FrameSpec(n_frames=6, size=16, target_fps=None)
    loader = torch.utils.data.DataLoader(_Clips([videos["grey"]] * 4, spec), batch_size=2, num_workers=2)
    batches = list(loader)
    frames, mask = batches[0]
    assert len(batches) == 2 and frames.shape == (2, 6, 3, 16, 16) and mask.all()
    assert torch.equal(batches[0][0], batches[1][0])
