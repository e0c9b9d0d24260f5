"""Stage-1 extraction configuration: one dataclass, written into the cache manifest."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

from diffret.cache.wti import check_padding

# Frame and word slots per dataset when --frames / --words are not given (the original's
# settings: the paragraph-retrieval sets of long videos use 64 frames and 64 words).
DATASET_SLOTS: dict[str, tuple[int, int]] = {"activitynet": (64, 64), "didemo": (64, 64)}
DEFAULT_SLOTS = (12, 32)

LOSSES = ("infonce", "dsl")

# Frame sampling rules (video.sample_frame_indices): "original" = DiffusionRet's OpenCV loader
# (integer frame rate, floor(linspace) subsampling); "exact" = the float rate and rounding.
FRAME_RULES = ("original", "exact")
# What a padded frame slot holds before the temporal transformer (model.Stage1Model.encode_video):
# "zero-frame" = the CLS feature of an all-zero normalised frame (the original); "zero-feature" = 0.
FRAME_PADDINGS = ("zero-frame", "zero-feature")
# The last second sampled per dataset when --end-second is not given (the original's DiDeMo
# loader reads seconds 0..31 of every video: its annotations stop at 30 s); others: the whole video.
DATASET_END_SECOND: dict[str, int] = {"didemo": 31}


def default_slots(dataset: str) -> tuple[int, int]:
    """(frames, words) used for `dataset` when the user gives none: (12, 32), or (64, 64)."""
    return DATASET_SLOTS.get(str(dataset).lower(), DEFAULT_SLOTS)


def default_end_second(dataset: str) -> int | None:
    """The last second sampled for `dataset` when the user gives none: 31 for didemo, else None."""
    return DATASET_END_SECOND.get(str(dataset).lower())


def check_sampling(rule: str, target_fps: float | None, end_second: int | None) -> None:
    """ValueError (one line) unless `rule`, `target_fps` and `end_second` make a sampling rule."""
    if rule not in FRAME_RULES:
        raise ValueError(f"unknown frame rule {rule!r}; known: {', '.join(FRAME_RULES)}")
    if target_fps is not None and not (target_fps > 0 and math.isfinite(target_fps)):
        raise ValueError(f"the sampling rate must be > 0 or uniform, got {target_fps}")
    if rule == "original" and target_fps is not None and not float(target_fps).is_integer():
        raise ValueError(f"the original frame rule samples a whole number of frames a second, got {target_fps} "
                         f"(use the exact rule for other rates)")
    if end_second is not None and (isinstance(end_second, bool) or not isinstance(end_second, (int, float))
                                   or not float(end_second).is_integer() or end_second < 0):
        raise ValueError(f"the last second sampled must be a whole number >= 0 or None, got {end_second!r}")


@dataclass
class ExtractConfig:
    """Everything that decides what `diffret extract` writes (defaults: the original recipe)."""

    dataset: str = "msrvtt"
    data_root: str = ""
    video_dir: str | None = None  # where the videos are, if not where the loader looks by default
    model: str = "ViT-B-32"
    pretrained: str = "openai"  # open_clip tag, local checkpoint path, or "none"
    frames: int = 12  # frame slots F
    words: int = 32  # word slots L: [SOS] + up to L-2 tokens + [EOT]
    target_fps: float | None = 1.0  # None: sample `frames` uniformly over the whole video
    frame_rule: str = "original"  # original | exact (see FRAME_RULES, video.sample_frame_indices)
    frame_padding: str = "zero-frame"  # zero-frame | zero-feature (see FRAME_PADDINGS)
    end_second: int | None = None  # sample seconds 0..end_second only (DiDeMo: 31); None: the whole video
    epochs: int = 5
    batch_size: int = 128  # global batch (split evenly over the processes under torchrun)
    lr: float = 1e-4  # new modules (temporal transformer, WTI head)
    clip_lr_scale: float = 1e-3  # CLIP's learning rate = lr * clip_lr_scale
    weight_decay: float = 0.2
    adam_betas: tuple[float, float] = (0.9, 0.98)
    adam_eps: float = 1e-6
    warmup: float = 0.1  # fraction of steps with linear warm-up, then cosine decay
    grad_clip: float = 1.0
    loss: str = "infonce"  # infonce | dsl (dual softmax, see model.dual_softmax_loss)
    dsl_temp: float = 1000.0
    wti_padding: str = "zero"  # zero | exclude: a padded (word, frame) pair in the WTI maxima (cache/wti.py)
    temporal_layers: int = 4
    workers: int = 2  # DataLoader decoding processes (per process under torchrun)
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    amp: bool = True  # automatic mixed precision (GPU only)
    grad_checkpointing: bool = False  # recompute activations in backward: less memory, ~30% slower
    shard_rows: int = 4096
    decode_timeout: float = 60.0  # seconds one video's decoding may take before it counts as failed
    stage1: str | None = None  # dump with this existing stage-1 checkpoint, no fine-tuning

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise ValueError(f"unknown loss {self.loss!r}; known: {', '.join(LOSSES)}")
        if self.frames < 1 or self.words < 3:
            raise ValueError(f"need --frames >= 1 and --words >= 3, got {self.frames} and {self.words}")
        if self.batch_size < 2 and self.epochs > 0:
            raise ValueError(f"contrastive fine-tuning needs --batch-size >= 2, got {self.batch_size}")
        self.adam_betas = tuple(self.adam_betas)
        check_padding(self.wti_padding)
        check_sampling(self.frame_rule, self.target_fps, self.end_second)
        if self.frame_padding not in FRAME_PADDINGS:
            raise ValueError(f"unknown frame padding {self.frame_padding!r}; known: {', '.join(FRAME_PADDINGS)}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ExtractConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


# Fields that decide the fine-tuned weights; a run may only resume or reuse a stage-1
# checkpoint whose values for these match. (workers, device, amp, grad_checkpointing and
# shard_rows change speed or memory, not the recipe.)
TRAINING_FIELDS = (
    "dataset", "data_root", "video_dir", "model", "pretrained", "frames", "words", "target_fps", "epochs",
    "batch_size", "lr", "clip_lr_scale", "weight_decay", "adam_betas", "adam_eps", "warmup", "grad_clip",
    "loss", "dsl_temp", "temporal_layers", "seed",
    "wti_padding",  # the similarity the loss trains (and the cache is scored by)
    "frame_rule", "end_second",  # which frames are decoded
    "frame_padding",  # the dumped padded slots only (never the weights): a resumed dump must not mix two kinds
)


def recipe_mismatch(saved: dict, cfg: ExtractConfig) -> str | None:
    """The first training field where `saved` (a config dict) differs from `cfg`, as a phrase; else None."""
    now = cfg.to_dict()
    for name in TRAINING_FIELDS:
        a, b = saved.get(name), now.get(name)
        if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
            a, b = list(a), list(b)
        if a != b:
            return f"{name} was {a!r}, now {b!r}"
    return None
