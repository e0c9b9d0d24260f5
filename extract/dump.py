"""Dumping stage-1 features into the cache: every video, then every caption, split by split.

Per video: frame tokens after the temporal transformer [F, D], frame mask, frame-weight logits.
Per caption: EOT sentence feature [D], word tokens [L, D], word mask, word-weight logits.
A video that cannot be decoded is left out with its reason; its captions are left out too.
"""
from __future__ import annotations

import torch

from diffret.cache.store import CacheWriter

from .data import video_loader
from .model import Stage1Model
from .video import FrameSpec, normalize


def _np16(x: torch.Tensor):
    return x.float().cpu().numpy().astype("float16")


@torch.no_grad()
def dump_videos(
    model: Stage1Model, writer: CacheWriter, split: str, video_ids: list[str], paths: list, spec: FrameSpec,
    device: torch.device, batch_size: int, workers: int, amp: bool, progress=None,
) -> dict[str, str]:
    """Encode and write one split's videos; returns {video_id: reason} for those that failed."""
    failed: dict[str, str] = {}
    mean, std = torch.tensor(spec.mean, device=device), torch.tensor(spec.std, device=device)
    loader = video_loader(paths, spec, batch_size, workers)
    task = progress.add_task(f"encode {split} videos", total=len(paths)) if progress else None
    for frames, mask, idx, reasons in loader:
        ok = mask.any(dim=1)
        for i in torch.nonzero(~ok).flatten().tolist():
            failed[video_ids[idx[i]]] = reasons[i]
        if ok.any():
            frames = normalize(frames[ok].to(device, non_blocking=True), mean, std)
            with torch.autocast(device.type, enabled=amp and device.type == "cuda"):
                out = model.encode_video(frames, mask[ok].to(device))
            keep = idx[ok].tolist()
            writer.add_video(
                split, [video_ids[i] for i in keep], [str(paths[i]) for i in keep],
                _np16(out["frames"]), out["frame_mask"].cpu().numpy(), _np16(out["frame_logits"]),
            )
        if progress:
            progress.update(task, advance=len(idx))
    if progress:
        progress.remove_task(task)
    return failed


@torch.no_grad()
def dump_texts(
    model: Stage1Model, writer: CacheWriter, split: str, caption_ids: list[str], video_ids: list[str],
    captions: list[str], tokens: torch.Tensor, device: torch.device, batch_size: int, amp: bool, progress=None,
) -> None:
    """Encode and write one split's captions (tokens [N, L])."""
    task = progress.add_task(f"encode {split} captions", total=len(captions)) if progress else None
    for s in range(0, len(captions), batch_size):
        sl = slice(s, s + batch_size)
        with torch.autocast(device.type, enabled=amp and device.type == "cuda"):
            out = model.encode_text(tokens[sl].to(device))
        writer.add_text(
            split, caption_ids[sl], video_ids[sl], captions[sl], _np16(out["sentence"]), _np16(out["words"]),
            out["word_mask"].cpu().numpy(), _np16(out["word_logits"]),
        )
        if progress:
            progress.update(task, advance=len(captions[sl]))
    if progress:
        progress.remove_task(task)
