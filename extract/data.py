"""Torch datasets that decode videos in DataLoader worker processes.

Each item decodes one video with its own decord reader (no shared state between workers), in a
child process bounded by `timeout` seconds (see video.read_frames). A video that cannot be read
yields an all-False mask and a one-line reason instead of raising, so one broken file never stops
a run: the caller drops it and records the failure.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from .video import FrameSpec, VideoDecodeError, read_frames_timed

def _decode(path: Path, spec: FrameSpec, timeout: float | None
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, str]:
    try:
        frames, mask, times = read_frames_timed(path, spec, timeout=timeout)
        return frames, mask, times, ""
    except VideoDecodeError as e:
        reason = e.reason
    except Exception as e:  # decoder bugs on odd files: record, never crash the run
        reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]
    blank = torch.zeros(spec.n_frames, 3, spec.size, spec.size, dtype=torch.uint8)
    return (blank, torch.zeros(spec.n_frames, dtype=torch.bool), torch.full((spec.n_frames,), -1.0),
            reason or "unreadable")


class VideoClips(Dataset):
    """Item i = (frames uint8 [F, 3, S, S], mask bool [F], i, reason) for paths[i]; with `times`,
    (frames, mask, times float32 [F] (decoded timestamps, seconds; -1 in padded slots), i, reason)."""

    def __init__(self, paths: list[Path], spec: FrameSpec, timeout: float | None, times: bool = False):
        self.paths = list(paths)
        self.spec = spec
        self.timeout = timeout
        self.times = times

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        frames, mask, times, reason = _decode(self.paths[i], self.spec, self.timeout)
        return (frames, mask, times, i, reason) if self.times else (frames, mask, i, reason)


def _worker_init(_):
    torch.set_num_threads(1)


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask, where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


@contextmanager
def threads_beside_workers(workers: int, device: torch.device):
    """While `workers` decoding processes run next to a model on the CPU, give the model at most
    the cores they leave (at least one): torch's intra-op threads busy-wait, and on a machine
    with as many busy processes as cores an extra thread makes every step several times slower
    (2 cores, 2 workers: one thread encodes a batch about 8x faster than two)."""
    before = torch.get_num_threads()
    want = max(1, min(before, usable_cores() - workers)) if device.type == "cpu" and workers > 0 else before
    torch.set_num_threads(want)
    try:
        yield want
    finally:
        torch.set_num_threads(before)


def window_batches(n: int, window: int, batch_size: int, first_window: int = 0) -> list[list[int]]:
    """Batches of item indices that never straddle a window boundary ([k*window, (k+1)*window)),
    starting at window `first_window`: the same items meet in the same batches on every run."""
    out = []
    for lo in range(first_window * window, n, window):
        hi = min(lo + window, n)
        out += [list(range(s, min(s + batch_size, hi))) for s in range(lo, hi, batch_size)]
    return out


def video_loader(paths, spec: FrameSpec, batch_size: int, workers: int, shuffle=False, seed=0, drop_last=False, *,
                 timeout: float | None, batches: list[list[int]] | None = None, times: bool = False):
    """DataLoader over VideoClips; `workers` decoding processes, one decoding thread each.
    `batches` (lists of indices into `paths`) replaces batch_size / shuffle / drop_last; `times`
    adds the frames' decoded timestamps to each batch (see VideoClips)."""
    g = torch.Generator().manual_seed(seed)
    common = dict(num_workers=workers, worker_init_fn=_worker_init, persistent_workers=False,
                  pin_memory=torch.cuda.is_available())
    if batches is not None:
        return DataLoader(VideoClips(paths, spec, timeout, times), batch_sampler=batches, **common)
    return DataLoader(
        VideoClips(paths, spec, timeout, times), batch_size=batch_size, shuffle=shuffle, generator=g, drop_last=drop_last,
        **common,
    )


class KeptClips:
    """Every distinct video of `paths` decoded once and kept in memory (uint8), for training epochs
    that would otherwise decode each video again for each of its captions in every epoch. Frame
    sampling in training is deterministic, so the batches are the ones the decoding loader gives.

    frames uint8 [U, F, 3, S, S], mask bool [U, F], reasons [U] ("" when read) over the U distinct
    paths; `row[i]` is the distinct video of pair i."""

    def __init__(self, paths: list, spec: FrameSpec, workers: int, timeout: float | None, progress=None):
        distinct, self.row = {}, []
        for p in paths:
            self.row.append(distinct.setdefault(str(p), len(distinct)))
        self.row = torch.tensor(self.row, dtype=torch.long)
        order = list(distinct)
        self.frames = torch.zeros(len(order), spec.n_frames, 3, spec.size, spec.size, dtype=torch.uint8)
        self.mask = torch.zeros(len(order), spec.n_frames, dtype=torch.bool)
        self.reasons = [""] * len(order)
        task = progress.add_task("decode training videos", total=len(order)) if progress else None
        for frames, mask, idx, reasons in video_loader([Path(p) for p in order], spec, 64, workers, timeout=timeout):
            self.frames[idx], self.mask[idx] = frames, mask
            for j, i in enumerate(idx.tolist()):
                self.reasons[i] = reasons[j]
            if progress:
                progress.update(task, advance=len(idx))
        if progress:
            progress.remove_task(task)

    @staticmethod
    def nbytes(n_videos: int, spec: FrameSpec) -> int:
        return n_videos * spec.n_frames * 3 * spec.size ** 2

    def batches(self, batches: list[list[int]]):
        """(frames, mask, pair indices, reasons) per batch of pair indices, as video_loader yields them."""
        for b in batches:
            idx = torch.tensor(b, dtype=torch.long)
            rows = self.row[idx]
            yield self.frames[rows], self.mask[rows], idx, [self.reasons[r] for r in rows.tolist()]


def kept_clips(paths: list, spec: FrameSpec, budget_gib: float, workers: int, timeout: float | None,
               progress=None) -> KeptClips | None:
    """KeptClips of `paths` when their decoded frames fit `budget_gib`, else None (decode every epoch)."""
    n = len({str(p) for p in paths})
    if budget_gib <= 0 or KeptClips.nbytes(n, spec) > budget_gib * 2 ** 30:
        return None
    return KeptClips(paths, spec, workers, timeout, progress)
