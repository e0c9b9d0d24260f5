"""Dumping stage-1 features into the cache: every video, then every caption, split by split.

Per video: frame tokens after the temporal transformer [F, D], frame mask, frame-weight logits.
Per caption: EOT sentence feature [D], word tokens [L, D], word mask, word-weight logits.
A video that cannot be decoded is left out with its reason; its captions are left out too.

Resumable: the inputs of a split are cut into windows of `writer.shard_rows` items, window k
becomes shard k, and batches never straddle windows, so every window is encoded the same way
on every run. A re-run skips the windows whose shards the writer already holds (see
diffret.cache.writer) and gives the same tensors as an uninterrupted run.
`check_output` / `start_output` decide, before any work, whether `--out` is resumed, replaced
or refused.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

from diffret.cache.journal import Journal
from diffret.cache.layout import SHARD_DIR
from diffret.cache.manifest import MANIFEST_NAME
from diffret.cache.writer import CacheWriter

from .data import threads_beside_workers, video_loader, window_batches
from .model import Stage1Model
from .video import FrameSpec, normalize


class OutputError(RuntimeError):
    """`--out` cannot be used as asked (one-line message)."""


def _np16(x: torch.Tensor):
    return x.float().cpu().numpy().astype("float16")


def _windows(n: int, size: int) -> int:
    return -(-n // size)


def _resume_point(writer: CacheWriter, kind: str, split: str, ids: list[str]) -> int:
    """The first window of `ids` to encode: after the finished shards that cover exactly the same
    inputs (the annotations may have changed since the interrupted run; then redo from there)."""
    size = writer.shard_rows
    for w in range(writer.completed(kind, split)):
        if sorted(writer.window_ids(kind, split, w)) != sorted(ids[w * size:(w + 1) * size]):
            writer.log(f"the {split} {'captions' if kind == 'text' else 'videos'} changed since the interrupted run: "
                       f"redoing them from shard {w}")
            writer.rewind(kind, split, w)
            return w
    return writer.completed(kind, split)


@torch.no_grad()
def dump_videos(
    model: Stage1Model, writer: CacheWriter, split: str, video_ids: list[str], paths: list, spec: FrameSpec,
    device: torch.device, batch_size: int, workers: int, amp: bool, progress=None, *, timeout: float | None,
) -> dict[str, str]:
    """Encode and write one split's videos (after the shards already finished); returns
    {video_id: reason} for every video of the split that failed, in this run or an earlier one."""
    n, size = len(paths), writer.shard_rows
    start = _resume_point(writer, "video", split, video_ids)
    batches = window_batches(n, size, batch_size, start)
    task = progress.add_task(f"encode {split} videos", total=n, completed=min(n, start * size)) if progress else None
    mean, std = torch.tensor(spec.mean, device=device), torch.tensor(spec.std, device=device)
    window = start
    with threads_beside_workers(workers if batches else 0, device):
        for frames, mask, idx, reasons in video_loader(paths, spec, batch_size, workers, timeout=timeout,
                                                       batches=batches) if batches else []:
            ok = mask.any(dim=1)
            bad = torch.nonzero(~ok).flatten().tolist()
            writer.add_failures([(video_ids[idx[i]], str(paths[idx[i]]), reasons[i]) for i in bad], split=split)
            if ok.any():
                frames = normalize(frames[ok].to(device, non_blocking=True), mean, std)
                with torch.autocast(device.type, enabled=amp and device.type == "cuda"):
                    out = model.encode_video(frames, mask[ok].to(device))
                keep = idx[ok].tolist()
                writer.add_video(
                    split, [video_ids[i] for i in keep], [str(paths[i]) for i in keep],
                    _np16(out["frames"]), out["frame_mask"].cpu().numpy(), _np16(out["frame_logits"]),
                )
            if int(idx[-1]) + 1 == min((window + 1) * size, n):  # last batch of the window: its shard is done
                writer.end_shard("video", split)
                window += 1
            if progress:
                progress.update(task, advance=len(idx))
    if progress:
        progress.remove_task(task)
    ids = set(video_ids)
    return {v: reason for v, (_, reason) in writer.failures.items() if v in ids}


@torch.no_grad()
def dump_texts(
    model: Stage1Model, writer: CacheWriter, split: str, caption_ids: list[str], video_ids: list[str],
    captions: list[str], tokens: torch.Tensor, device: torch.device, batch_size: int, amp: bool, progress=None,
) -> None:
    """Encode and write one split's captions (tokens [N, L]) after the shards already finished."""
    n, size = len(captions), writer.shard_rows
    start = _resume_point(writer, "text", split, caption_ids)
    task = progress.add_task(f"encode {split} captions", total=n, completed=min(n, start * size)) if progress else None
    for lo, hi in ((w * size, min((w + 1) * size, n)) for w in range(start, _windows(n, size))):
        for s in range(lo, hi, batch_size):
            sl = slice(s, min(s + batch_size, hi))
            with torch.autocast(device.type, enabled=amp and device.type == "cuda"):
                out = model.encode_text(tokens[sl].to(device))
            writer.add_text(
                split, caption_ids[sl], video_ids[sl], captions[sl], _np16(out["sentence"]), _np16(out["words"]),
                out["word_mask"].cpu().numpy(), _np16(out["word_logits"]),
            )
            if progress:
                progress.update(task, advance=sl.stop - sl.start)
        writer.end_shard("text", split)
    if progress:
        progress.remove_task(task)


# --------------------------------------------------------------------------- the output folder


def _ours(out: Path) -> bool:
    return any((out / name).exists() for name in (MANIFEST_NAME, "progress", SHARD_DIR, "stage1.pt"))


def check_output(out: Path, overwrite: bool, mismatch=None) -> bool:
    """Decide, writing nothing, what to do with `out`; returns True when an unfinished run is resumed.

    A complete cache (manifest present) is refused without `overwrite` (there is nothing to do).
    The remains of an interrupted run are resumed; `mismatch(saved_config)` (a phrase, or None)
    refuses a resume with other settings. A non-empty folder that is not ours is always refused.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out} is a file, not a folder")
    if not out.is_dir() or not any(out.iterdir()):
        return False
    if not _ours(out):
        raise OutputError(f"--out {out} is not empty and holds no diffret cache; choose a new or empty folder")
    if overwrite:
        return False
    if (out / MANIFEST_NAME).exists():
        raise OutputError(f"{out} already holds a complete cache (nothing to do); pass --overwrite to rebuild it")
    run = Journal(out).read_run()
    why = mismatch(run.get("config", {})) if (run and mismatch) else None
    if why:
        raise OutputError(f"{out} holds an unfinished extraction with other settings ({why}); re-run it with "
                          f"the same settings to resume, or pass --overwrite to start over")
    return True


def start_output(out: Path, config: dict, resume: bool, log=print) -> None:
    """Make `out` ready: clear it unless resuming, check that it is writable, record the run's settings."""
    out = Path(out)
    if out.is_dir() and any(out.iterdir()) and not resume:  # --overwrite (check_output vetted the folder)
        log(f"--overwrite: removing the existing contents of {out}")
        shutil.rmtree(out)
    elif resume:
        log(f"resuming the unfinished extraction in {out}")
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=out)
        os.close(fd)
        os.unlink(probe)
        journal = Journal(out)
        if not (resume and journal.read_run()):
            journal.write_run({"config": config})
    except OSError as e:
        raise OutputError(f"cannot write to {out}: {e.strerror or e}") from None
