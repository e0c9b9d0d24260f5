"""Video decoding and CLIP frame preprocessing (decord).

`read_frames` opens one file, samples up to `n_frames` frames (by the original DiffusionRet's
rule by default, see sample_frame_indices), resizes their shortest side to
`size` (bicubic, antialiased, as PIL/torchvision do for CLIP) and centre-crops them, returning
uint8 frames plus a mask for the padded slots (read_frames_timed: and every sampled frame's decoded
timestamp; rule "timestamps" picks frames by those times, see sample_by_time). Frames decord 0.6 cannot deliver (its
width-alignment bug, some damaged streams) are decoded again with PyAV. With a `timeout`, the
decoding runs in a helper process that is killed when it overruns (decord can hang on damaged
files) or that dies on its own (a decoder crash): either becomes a one-line reason, never a
stuck or dead worker (see decoder.py). It is safe to call from DataLoader worker processes. `normalize` turns the uint8 frames into model input.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .config import check_sampling

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class VideoDecodeError(RuntimeError):
    """A video that cannot be read. `reason` is a one-line cause, e.g. "file not found"."""

    def __init__(self, path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


@dataclass
class FrameSpec:
    """How frames are sampled and shaped for the image encoder."""

    n_frames: int = 12  # frame slots per video (padded, masked)
    size: int = 224  # shortest side resized to `size` (bicubic), then centre crop size x size
    target_fps: float | None = 1.0  # None: uniform over the whole video (see sample_frame_indices)
    mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    std: tuple[float, float, float] = OPENAI_CLIP_STD
    rule: str = "original"  # original | exact (see sample_frame_indices) | timestamps (see sample_by_time)
    end_second: int | None = None  # sample seconds 0..end_second only; None: the whole video

    def __post_init__(self):
        if self.n_frames < 1:
            raise ValueError(f"n_frames must be >= 1, got {self.n_frames}")
        if self.size < 1:
            raise ValueError(f"size must be >= 1, got {self.size}")
        check_sampling(self.rule, self.target_fps, self.end_second)


def sample_frame_indices(
    num_frames_total: int, native_fps: float, n_frames: int, target_fps: float | None = 1.0,
    rule: str = "original", end_second: int | None = None,
) -> list[int]:
    """Sorted, distinct frame indices to decode; never empty when num_frames_total >= 1.

    Candidates, then, when there are more than `n_frames`, `n_frames` of them spread uniformly;
    fewer: all of them (the caller pads the remaining slots and masks them out), so a 3 s clip
    gives 3 frames at 1 fps. `end_second` keeps only seconds 0..end_second (the original's
    end_time: DiDeMo's loader reads seconds 0..31).

    rule "original", DiffusionRet's OpenCV loader (rawvideo_util.RawVideoExtractorCV2.video_to_tensor
    and the datasets' _get_rawvideo): r = int(native_fps), truncated (29.97 -> 29; at least 1);
    candidates are frames sec * r + j for every second sec and j in arange(0, r, r // target_fps)
    (first target_fps of them); target_fps None (its framerate 0): every frame. Subsampling keeps
    candidates[np.linspace(0, len - 1, n_frames, dtype=int)], i.e. floor. A 300-frame clip at
    29.97 fps gives frames 0, 29, ..., 290: 11 at 1 fps. target_fps must be a whole number.

    rule "exact": candidates are frames round(i * native_fps / target_fps) for i = 0, 1, ...
    (below num_frames_total; 1 a second by default), subsampled with round(linspace); the same
    clip gives frames 0, 30, ..., 270: 10. target_fps None: round(linspace(0, total - 1, n)) over
    the whole video (`native_fps` is then needed only with end_second). Rounding is numpy's
    (half to even).
    """
    total = int(num_frames_total)
    if total < 1:
        raise ValueError(f"num_frames_total must be >= 1, got {num_frames_total}")
    if n_frames < 1:
        raise ValueError(f"n_frames must be >= 1, got {n_frames}")
    check_sampling(rule, target_fps, end_second)
    if rule == "timestamps":
        raise ValueError("the timestamps rule samples by decoded time: use sample_by_time")
    if (target_fps is not None or end_second is not None) and not (math.isfinite(native_fps) and native_fps > 0):
        raise ValueError(f"need native_fps > 0, got {native_fps}")
    if rule == "original":
        return _original_indices(total, native_fps, n_frames, target_fps, end_second)
    if target_fps is None:
        if end_second is not None:
            total = max(1, min(total, math.ceil((end_second + 1) * native_fps)))
        idx = np.rint(np.linspace(0, total - 1, min(n_frames, total)))
        return sorted({int(i) for i in idx})
    step = native_fps / target_fps
    steps = np.arange(math.ceil(total / step) + 1)
    if end_second is not None:
        steps = steps[steps < (end_second + 1) * target_fps]  # sample times before end_second + 1
    cand = np.rint(steps * step).astype(np.int64)
    cand = np.unique(cand[cand < total])  # unique also sorts; repeats only if step < 1
    if len(cand) > n_frames:
        cand = cand[np.rint(np.linspace(0, len(cand) - 1, n_frames)).astype(np.int64)]
    return [int(i) for i in cand]


def sample_by_time(times, n_frames: int, target_fps: float | None = 1.0, end_second: int | None = None) -> list[int]:
    """Rule "timestamps": sorted, distinct indices of the frames whose decoded timestamps `times`
    (seconds, one per frame in decoding order) are nearest each target time; for variable-frame-rate
    videos, where a frame's index says little about its time.

    Target times: 0, 1/target_fps, 2/target_fps, ... up to the last frame's timestamp (and before
    end_second + 1), subsampled to `n_frames` with round(linspace) as the exact rule does; target_fps
    None: `n_frames` times spread uniformly from the first to the last timestamp (up to end_second + 1).
    A frame nearest several targets is taken once (ties: the earlier frame).
    """
    t = np.asarray(times, dtype=np.float64).reshape(-1)
    if len(t) < 1:
        raise ValueError("no frames")
    if n_frames < 1:
        raise ValueError(f"n_frames must be >= 1, got {n_frames}")
    check_sampling("timestamps", target_fps, end_second)
    if not np.isfinite(t).all():
        raise ValueError("non-finite frame timestamps")
    order = np.argsort(t, kind="stable")  # decoding order is presentation order, except B-frame oddities
    ts = t[order]
    first, last = ts[0], ts[-1]
    if end_second is not None:
        last = min(last, float(end_second + 1))
    if target_fps is None:
        targets = np.linspace(first, last, n_frames) if last > first else np.array([first])
    else:
        targets = np.arange(0, math.floor(max(0.0, last) * target_fps) + 1) / target_fps
        if end_second is not None:
            targets = targets[targets < end_second + 1]
        if len(targets) == 0:
            targets = np.array([first])
        if len(targets) > n_frames:
            targets = targets[np.rint(np.linspace(0, len(targets) - 1, n_frames)).astype(np.int64)]
    pos = np.clip(np.searchsorted(ts, targets), 1, len(ts) - 1) if len(ts) > 1 else np.zeros(len(targets), np.int64)
    if len(ts) > 1:
        pos = np.where(np.abs(ts[pos - 1] - targets) <= np.abs(ts[pos] - targets), pos - 1, pos)
    return sorted({int(order[p]) for p in pos})


def _original_indices(total: int, native_fps: float, n_frames: int, target_fps: float | None,
                      end_second: int | None) -> list[int]:
    """sample_frame_indices under rule "original" (arguments already checked)."""
    rate = max(1, int(native_fps)) if math.isfinite(native_fps) and native_fps > 0 else 1
    if end_second is not None:  # its loop runs over seconds start..end_second inclusive
        total = min(total, (int(end_second) + 1) * rate)
    if target_fps is None:
        cand = np.arange(total)
    else:
        per_second = int(target_fps)
        offsets = np.arange(0, rate, max(1, rate // per_second))[:per_second]
        cand = (np.arange(-(-total // rate))[:, None] * rate + offsets[None, :]).ravel()
        cand = cand[cand < total]  # its reads stop at the first frame past the end
    if len(cand) > n_frames:
        cand = cand[np.linspace(0, len(cand) - 1, num=n_frames, dtype=int)]
    return [int(i) for i in cand]


def first_line(e: BaseException) -> str:
    """First line of an exception message without decord's "[hh:mm:ss] file.cc:123: " prefixes
    and "Check failed: <expression> (a vs. b)" noise, at most 200 characters."""
    text = str(e).strip().splitlines()
    line = text[0] if text else type(e).__name__
    line = re.sub(r"\[[\d:]+\]\s+\S+:\d+:\s*", "", line)
    line = re.sub(r"Check failed: .*?\(-?\d+ vs\. -?\d+\)\s*", "", line).strip()
    if line.startswith("Cannot create buffer source"):
        line = "no decodable video stream (" + line + ")"
    return (line or type(e).__name__)[:200]


def decode_uint8(path: Path, spec: FrameSpec) -> tuple[np.ndarray, np.ndarray]:
    """The sampled frames of `path` as uint8 [k, H, W, 3] (RGB), k <= spec.n_frames, and their
    decoded timestamps (start, seconds) as float32 [k], -1 where the decoder gives none."""
    import decord  # imported lazily: decord is only needed where videos are decoded

    if not path.is_file():
        raise VideoDecodeError(path, "file not found")
    if path.stat().st_size == 0:
        raise VideoDecodeError(path, "empty file (0 bytes)")
    try:
        vr = decord.VideoReader(str(path), num_threads=1)
    except Exception as e:  # decord raises plain RuntimeError/DECORDError
        raise VideoDecodeError(path, f"cannot open: {first_line(e)}") from None
    try:
        total, fps = len(vr), float(vr.get_avg_fps())
        if total < 1:
            raise VideoDecodeError(path, "no frames")
        if (spec.target_fps is not None or spec.end_second is not None) and not (math.isfinite(fps) and fps > 0):
            raise VideoDecodeError(path, f"invalid frame rate {fps}")
        if spec.rule == "timestamps":  # by decoded time: every frame's timestamp (demuxed, not decoded)
            try:
                all_times = np.asarray(vr.get_frame_timestamp(list(range(total))), np.float64)[:, 0]
                indices = sample_by_time(all_times, spec.n_frames, spec.target_fps, spec.end_second)
            except Exception as e:  # noqa: BLE001  (decord errors, non-finite timestamps)
                raise VideoDecodeError(path, f"cannot read the frame timestamps: {first_line(e)}") from None
        else:
            indices = sample_frame_indices(total, fps, spec.n_frames, spec.target_fps, spec.rule, spec.end_second)
        times = None
        try:
            times = np.asarray(vr.get_frame_timestamp(indices), np.float64)[:, 0].astype(np.float32)
            batch = vr.get_batch(indices)
            # asnumpy() for decord's native bridge; np.asarray if someone set another bridge
            arr = batch.asnumpy() if hasattr(batch, "asnumpy") else np.asarray(batch)
            reason = None if _good_shape(arr, len(indices)) else f"unexpected decoded shape {tuple(arr.shape)}"
        except Exception as e:
            reason = first_line(e)
    finally:
        # Release the reader (and its decoder thread) now, even when raising: kept alive by an
        # exception's traceback in a DataLoader's parent process, it would be garbage-collected
        # in a forked worker, which then aborts ("std::system_error: No such process").
        del vr
    if reason is not None:
        # decord 0.6 fails on some frame widths (16, 24, 48, 72 px: "from_size == to_size",
        # dmlc/decord#336) and on some damaged streams; PyAV decodes those frames instead.
        got = decode_pyav_timed(path, indices)
        if got is None or not _good_shape(got[0], len(indices)):
            raise VideoDecodeError(path, f"cannot decode frames {indices[0]}..{indices[-1]} of {total}: {reason}")
        arr, times = got
    if times is None or len(times) != len(arr):  # no timestamps: the frames are still good
        times = np.full(len(arr), -1.0, np.float32)
    times = np.where(np.isfinite(times), times, -1.0).astype(np.float32)  # unknown (a frame without pts): -1
    return arr, times


def _good_shape(arr: np.ndarray, k: int) -> bool:
    return arr.ndim == 4 and arr.shape[0] == k and arr.shape[-1] == 3 and arr.dtype == np.uint8 and 0 not in arr.shape


def decode_pyav(path: Path, indices: list[int]) -> np.ndarray | None:
    """Frames `indices` (sorted) of `path` as uint8 [k, H, W, 3] by sequential PyAV decoding;
    None if PyAV is missing, cannot decode the file, or the stream ends before the last index."""
    got = decode_pyav_timed(path, indices)
    return None if got is None else got[0]


def decode_pyav_timed(path: Path, indices: list[int]) -> tuple[np.ndarray, np.ndarray] | None:
    """decode_pyav, plus the frames' timestamps (frame.pts * time_base, seconds) as float32 [k]."""
    try:
        import av
    except ImportError:
        return None
    want, last, out, when = set(indices), indices[-1], {}, {}
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            stream.thread_count = 1
            for i, frame in enumerate(container.decode(stream)):
                if i in want:
                    out[i] = frame.to_ndarray(format="rgb24")
                    base = frame.time_base if frame.time_base is not None else stream.time_base
                    when[i] = float(frame.pts * base) if frame.pts is not None and base is not None else math.nan
                if i >= last:
                    break
    except Exception:  # av.error.FFmpegError and friends; the caller reports decord's reason
        return None
    if len(out) != len(indices):
        return None
    return np.stack([out[i] for i in indices]), np.array([when[i] for i in indices], np.float32)


def resize_center_crop(frames: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 [k, 3, H, W] -> uint8 [k, 3, size, size]: shortest side to `size`, centre crop.

    Bicubic with antialiasing, computed by torch's uint8 kernel, which follows PIL's fixed-point
    resampling (what CLIP's preprocessing used): within 1 grey level of PIL almost everywhere
    (mean difference about 0.01), and 10x faster than resizing in float32, whose overshoot is
    clamped differently (up to 25 levels off PIL on sharp edges). The long side becomes
    int(size * long / short) and the crop offset round((dim - size) / 2), as
    torchvision.transforms.Resize + CenterCrop compute them.
    """
    h, w = frames.shape[-2:]
    short, long = (h, w) if h <= w else (w, h)
    new_short, new_long = size, int(size * long / short)
    new_h, new_w = (new_short, new_long) if h <= w else (new_long, new_short)
    if (new_h, new_w) != (h, w):
        frames = _resize_bicubic_uint8(frames, new_h, new_w)
    top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
    return frames[..., top : top + size, left : left + size].contiguous()


def _resize_bicubic_uint8(frames: torch.Tensor, h: int, w: int) -> torch.Tensor:
    try:
        return F.interpolate(frames, size=(h, w), mode="bicubic", align_corners=False, antialias=True)
    except (RuntimeError, NotImplementedError):  # a torch without the uint8 kernel: resize in float32
        x = F.interpolate(frames.float(), size=(h, w), mode="bicubic", align_corners=False, antialias=True)
        return x.clamp_(0, 255).round_().to(torch.uint8)


def read_frames(path, spec: FrameSpec, timeout: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """read_frames_timed without the timestamps: (frames, mask)."""
    frames, mask, _ = read_frames_timed(path, spec, timeout)
    return frames, mask


def read_frames_timed(path, spec: FrameSpec, timeout: float | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Decode, sample and crop one video.

    Returns (frames uint8 [n_frames, 3, size, size], mask bool [n_frames]): the first k slots
    hold the sampled frames in time order (mask True), the rest are zeros (mask False); plus
    times float32 [n_frames]: each sampled frame's decoded timestamp (seconds), -1 in padded slots.
    Raises VideoDecodeError (one-line `reason`) for a missing, empty, unreadable or frameless file,
    and, with `timeout` (seconds), for one whose decoding overruns it or crashes the decoder.
    """
    path = Path(path)
    if timeout:
        from .decoder import decode_bounded  # a helper process with a watchdog (decoder.py)

        arr, ts = decode_bounded(path, spec, timeout)
    else:
        arr, ts = decode_uint8(path, spec)
    k = arr.shape[0]
    frames = torch.zeros(spec.n_frames, 3, spec.size, spec.size, dtype=torch.uint8)
    frames[:k] = resize_center_crop(torch.from_numpy(arr).permute(0, 3, 1, 2), spec.size)
    mask = torch.zeros(spec.n_frames, dtype=torch.bool)
    mask[:k] = True
    times = torch.full((spec.n_frames,), -1.0, dtype=torch.float32)
    times[:k] = torch.from_numpy(np.asarray(ts, np.float32))
    return frames, mask, times


def normalize(frames_uint8: torch.Tensor, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD) -> torch.Tensor:
    """uint8 [..., 3, H, W] -> float32 [..., 3, H, W]: x / 255, then (x - mean) / std per channel."""
    if frames_uint8.ndim < 3 or frames_uint8.shape[-3] != 3:
        raise ValueError(f"expected frames shaped [..., 3, H, W], got {tuple(frames_uint8.shape)}")
    x = frames_uint8.to(torch.float32) / 255.0
    m = torch.as_tensor(mean, dtype=torch.float32, device=x.device).view(3, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32, device=x.device).view(3, 1, 1)
    return (x - m) / s
