"""`diffret extract` end to end: annotations -> stage-1 model -> fine-tune -> checkpoint -> cache."""
from __future__ import annotations

import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from diffret.cache.manifest import MANIFEST_NAME, Manifest
from diffret.cache.store import CacheWriter, write_failures

from .annotations import load_annotations
from .backbone import build_clip, clip_mean_std, get_tokenizer, image_size
from .config import ExtractConfig
from .dump import dump_texts, dump_videos
from .finetune import finetune
from .model import Stage1Model, fingerprint
from .video import FrameSpec

CHECKPOINT_NAME = "stage1.pt"


class ExtractError(RuntimeError):
    """Extraction cannot start (one-line message)."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ExtractError("--device cuda was asked for but no CUDA GPU is visible")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_stage1(cfg: ExtractConfig) -> tuple[Stage1Model, FrameSpec]:
    clip = build_clip(cfg.model, cfg.pretrained)
    mean, std = clip_mean_std(clip)
    spec = FrameSpec(n_frames=cfg.frames, size=image_size(clip), target_fps=cfg.target_fps, mean=mean, std=std)
    return Stage1Model(clip, max_frames=cfg.frames, temporal_layers=cfg.temporal_layers), spec


def save_checkpoint(path: Path, model: Stage1Model, cfg: ExtractConfig, fp: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save({"config": cfg.to_dict(), "fingerprint": fp, "state_dict": model.state_dict()}, tmp)
    tmp.replace(path)


def run_stage1(cfg: ExtractConfig, out: Path, overwrite: bool = False, progress=None, log=print) -> dict:
    """Fine-tune (cfg.epochs, 0 = zero-shot) and dump the cache into `out`; returns a summary."""
    out = Path(out)
    if (out / MANIFEST_NAME).exists():
        if not overwrite:
            raise ExtractError(f"{out} already holds a cache; pass --overwrite to replace it")
        shutil.rmtree(out)
    ann = load_annotations(cfg.dataset, cfg.data_root)
    if not ann.split("train") and cfg.epochs > 0:
        raise ExtractError(f"{cfg.data_root} has no training captions to fine-tune on (use --epochs 0)")
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    model, spec = build_stage1(cfg)
    model.to(device)
    tokenizer = get_tokenizer(cfg.model)
    t0 = time.time()

    failures: dict[str, str] = {}  # path -> reason
    train = ann.split("train")
    if cfg.epochs > 0:
        tokens = tokenizer([c.text for c in train], context_length=cfg.words)
        paths = [ann.videos[c.video_id] for c in train]
        history = finetune(model, tokens, paths, spec, cfg, device, progress, failures)
        log(f"fine-tuned {cfg.epochs} epochs on {len(train)} pairs: loss per epoch {[round(h, 3) for h in history]}")
    model.eval()
    fp = fingerprint(model)
    out.mkdir(parents=True, exist_ok=True)
    save_checkpoint(out / CHECKPOINT_NAME, model, cfg, fp)

    manifest = Manifest(
        width=model.width, n_words=cfg.words, n_frames=cfg.frames, dataset=cfg.dataset,
        model={"name": cfg.model, "pretrained": str(cfg.pretrained), "fingerprint": fp},
        extract_config=cfg.to_dict(), logit_scale=float(model.logit_scale.item()),
    )
    writer = CacheWriter(out, manifest, shard_rows=cfg.shard_rows)
    failed_videos: dict[str, str] = {}
    counts = {}
    for split in ("train", "test"):
        caps = ann.split(split)
        if not caps:
            continue
        vids = ann.video_ids(split)
        failed_videos.update(dump_videos(
            model, writer, split, vids, [ann.videos[v] for v in vids], spec, device,
            batch_size=max(1, min(cfg.batch_size, 64)), workers=cfg.workers, amp=cfg.amp, progress=progress,
        ))
        caps = [c for c in caps if c.video_id not in failed_videos]
        tokens = tokenizer([c.text for c in caps], context_length=cfg.words)
        dump_texts(
            model, writer, split, [c.caption_id for c in caps], [c.video_id for c in caps],
            [c.text for c in caps], tokens, device, batch_size=256, amp=cfg.amp, progress=progress,
        )
        counts[split] = {"captions": len(caps), "videos": len(vids) - sum(v in failed_videos for v in vids)}
    path_of = {str(p): v for v, p in ann.videos.items()}
    for path, reason in failures.items():
        failed_videos.setdefault(path_of.get(path, path), reason)
    write_failures(out, [(v, str(ann.videos.get(v, "")), r) for v, r in sorted(failed_videos.items())])
    writer.close()
    return {
        "cache": str(out), "checkpoint": str(out / CHECKPOINT_NAME), "fingerprint": fp, "splits": counts,
        "failed": len(failed_videos), "failures_file": str(out / "failures.parquet"),
        "seconds": round(time.time() - t0, 1), "device": str(device),
    }
