"""Stage-1 extraction configuration: one dataclass, written into the cache manifest."""
from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class ExtractConfig:
    """Everything that decides what `diffret extract` writes (defaults: the original recipe)."""

    dataset: str = "msrvtt"
    data_root: str = ""
    model: str = "ViT-B-32"
    pretrained: str = "openai"  # open_clip tag, local checkpoint path, or "none"
    frames: int = 12  # frame slots F
    words: int = 32  # word slots L: [SOS] + up to L-2 tokens + [EOT]
    target_fps: float | None = 1.0  # None: sample `frames` uniformly over the whole video
    epochs: int = 5
    batch_size: int = 128
    lr: float = 1e-4  # new modules (temporal transformer, WTI head)
    clip_lr_scale: float = 1e-3  # CLIP's learning rate = lr * clip_lr_scale
    weight_decay: float = 0.2
    warmup: float = 0.1  # fraction of steps with linear warm-up, then cosine decay
    grad_clip: float = 1.0
    temporal_layers: int = 4
    workers: int = 2  # DataLoader decoding processes
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    amp: bool = True  # automatic mixed precision (GPU only)
    shard_rows: int = 4096

    def to_dict(self) -> dict:
        return asdict(self)
