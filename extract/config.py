"""Stage-1 extraction configuration: one dataclass, written into the cache manifest.

Each field's metadata is its `diffret extract` option (help, flag, choices, how the command line's
text becomes the value; see pipeline/commands/options.py), so a default or a choice list is written
once, here or beside what implements it.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from diffret.cache.numbers import check_numbers
from diffret.cache.wti import WTI_PADDINGS, check_padding

from .annotations import dataset_names
from .recipe import RECIPES

SELECT_ON = ("last", "val")  # the weights kept: the last epoch's, or the best on validation

# Frame and word slots per dataset when --frames / --words are not given (the original's
# settings: the paragraph-retrieval sets of long videos use 64 frames and 64 words).
DATASET_SLOTS: dict[str, tuple[int, int]] = {"activitynet": (64, 64), "didemo": (64, 64)}
DEFAULT_SLOTS = (12, 32)

LOSSES = ("infonce", "dsl")

# Frame sampling rules (video.sample_frame_indices): "original" = DiffusionRet's OpenCV loader
# (integer frame rate, floor(linspace) subsampling); "exact" = the float rate and rounding (both pick
# frames by index at the average rate); "timestamps" = by decoded time (video.sample_by_time), for
# variable-frame-rate videos.
FRAME_RULES = ("original", "exact", "timestamps")
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


def _by_dataset(table: dict) -> str:
    """{"activitynet": 64, "didemo": 64} -> "64 for activitynet and didemo" (a default shown in --help)."""
    groups: dict = {}
    for name, value in table.items():
        groups.setdefault(value, []).append(name)
    return "; ".join(f"{value} for {' and '.join(names)}" for value, names in groups.items())


def _parse_fps(text: str) -> float | None:
    """--fps: a rate, or 'uniform' (None)."""
    return None if text == "uniform" else float(text)


def _parse_end_second(text: str) -> int | None:
    """--end-second: a whole number, or 'none' (None)."""
    if text.isdigit() or text.lower() == "none":
        return int(text) if text.isdigit() else None
    raise ValueError(f"--end-second: {text!r} is not a whole number or 'none'")


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


# The range of each number of ExtractConfig (cache/numbers.py: every number must also be finite).
NUMBER_RULES = {
    "epochs": ">=0", "batch_size": ">=1", "lr": ">0", "clip_lr_scale": ">=0", "weight_decay": ">=0",
    "adam_betas": "[0,1)", "adam_eps": ">0", "warmup": "[0,1]", "grad_clip": ">0", "dsl_temp": ">0",
    "temporal_layers": ">=0", "workers": ">=0", "keep_frames": ">=0", "seed": ">=0", "shard_rows": ">=1", "decode_timeout": ">0",
    "val_fraction": "[0,1)", "eval_every": ">=1", "ema": "[0,1)",
}


@dataclass
class ExtractConfig:
    """Everything that decides what `diffret extract` writes (defaults: the original recipe)."""

    dataset: str = field(default="msrvtt", metadata={"help": (
        f"Annotation format of --data-root: {', '.join(dataset_names()[:-1])}, or {dataset_names()[-1]} "
        "(a CSV / JSONL file of video,caption,split for your own videos); folder: every video file below "
        "--data-root, without captions (for search; dump it with --stage1).")})
    data_root: str = field(default="", metadata={
        "required": True, "path": True, "parse": lambda p: str(Path(p).resolve()),
        "help": "Dataset folder (for --dataset manifest: the manifest file, or its folder)."})
    video_dir: str | None = field(default=None, metadata={  # None: where the loader looks by default
        "show_default": "where --dataset looks by default",
        "help": "Folder of the videos, relative to --data-root or absolute."})
    model: str = field(default="ViT-B-32", metadata={"help": "open_clip model name (or `tiny`)."})
    pretrained: str = field(default="openai", metadata={"help": "open_clip tag, local checkpoint path, or none."})
    frames: int = field(default=DEFAULT_SLOTS[0], metadata={  # frame slots F
        "default_from": ("dataset", lambda d: default_slots(d)[0]),
        "show_default": f"{DEFAULT_SLOTS[0]}; {_by_dataset({d: s[0] for d, s in DATASET_SLOTS.items()})}",
        "help": "Frame slots per video."})
    words: int = field(default=DEFAULT_SLOTS[1], metadata={  # word slots L: [SOS] + up to L-2 tokens + [EOT]
        "default_from": ("dataset", lambda d: default_slots(d)[1]),
        "show_default": f"{DEFAULT_SLOTS[1]}; {_by_dataset({d: s[1] for d, s in DATASET_SLOTS.items()})}",
        "help": "Word slots per caption ([SOS] + tokens + [EOT])."})
    target_fps: float | None = field(default=1.0, metadata={  # None: `frames` spread over the whole video
        "flag": "--fps", "parse": _parse_fps, "format": lambda v: "uniform" if v is None else f"{v:g}",
        "help": "Sampling rate before subsampling; 'uniform' spreads --frames over the video."})
    frame_rule: str = field(default="original", metadata={  # see video.sample_frame_indices
        "choices": FRAME_RULES, "metavar": "RULE",
        "help": "Which frames: original (integer fps, 29.97 -> 29; floor(linspace)), exact (float fps, rounded) or "
                "timestamps (nearest decoded time: variable-rate videos)."})
    frame_padding: str = field(default="zero-frame", metadata={
        "choices": FRAME_PADDINGS, "metavar": "KIND",
        "help": "Padded frame slots: the CLS feature of an all-zero normalised frame (zero-frame, the original) or "
                "zeros (zero-feature)."})
    end_second: int | None = field(default=None, metadata={  # sample seconds 0..end_second only; None: all
        "default_from": ("dataset", default_end_second), "parse": _parse_end_second, "metavar": "N|none",
        "show_default": f"{_by_dataset(DATASET_END_SECOND)}, else none",
        "help": "Sample seconds 0..N of each video only (the original reads DiDeMo to second 31); 'none': all."})
    epochs: int = field(default=5, metadata={"help": "Fine-tuning epochs (0: zero-shot dump)."})
    batch_size: int = field(default=128, metadata={  # split evenly over the processes under torchrun
        "help": "Global batch (split over the processes under torchrun)."})
    lr: float = field(default=1e-4, metadata={  # temporal transformer, WTI head
        "help": "Learning rate of the new modules."})
    clip_lr_scale: float = field(default=1e-3, metadata={"help": "CLIP's lr = lr x this."})
    recipe: str = field(default="original", metadata={  # see recipe.py
        "choices": RECIPES,
        "help": "original: BertAdam as the original trains (no bias correction; warm-up, then cos(pi x) of the total "
                "progress x, so the lr drops right after the warm-up); decay 0.2 on every weight whose name has no "
                "'bias' or 'LayerNorm.' (embeddings, logit_scale, ln_* weights too); CLIP's conv1 frozen; CLIP's "
                "weights float16, updated in place (a GPU: float16 tensors, no gradient scaler for them; a CPU: "
                "float32 rounded to float16 after every update). modern: AdamW, decay on matrices, cosine after "
                "the warm-up, all float32, conv1 trained."})
    weight_decay: float = 0.2
    adam_betas: tuple[float, float] = (0.9, 0.98)
    adam_eps: float = 1e-6
    warmup: float = field(default=0.1, metadata={"help": "Fraction of the steps with linear warm-up (then cosine)."})
    select_on: str = field(default="last", metadata={  # see pipeline/selection.py
        "choices": SELECT_ON,
        "help": "Which weights stage 1 keeps: the last epoch's, or the best by t2v R@1 on a validation split (the "
                "dataset's own where it has one, else --val-fraction of the training videos held out and cached as "
                "the val split), raw or EMA, evaluated every --eval-every steps and at each epoch end. The test split "
                "is never read while training."})
    val_fraction: float = field(default=0.1, metadata={
        "help": "With --select-on val and no validation split in the dataset: the share of training videos held "
                "out (seeded by --seed)."})
    eval_every: int = field(default=150, metadata={"help": "With --select-on val: validate every N steps (and at "
                                                          "each epoch end)."})
    ema: float = field(default=0.99, metadata={"help": "With --select-on val: the EMA decay of the weights also "
                                                      "validated (the original's --moment)."})
    grad_clip: float = field(default=1.0, metadata={"help": "Gradient-norm clipping."})
    loss: str = field(default="infonce", metadata={  # see model.dual_softmax_loss
        "choices": LOSSES, "help": "Training loss: symmetric InfoNCE, or the dual softmax loss (temperature 1000)."})
    dsl_temp: float = 1000.0
    wti_padding: str = field(default="zero", metadata={  # a padded (word, frame) pair: see cache/wti.py
        "choices": WTI_PADDINGS, "help": "A padded pair in the WTI maxima: counts as 0 (the original) or never wins."})
    temporal_layers: int = 4
    workers: int = field(default=2, metadata={"help": "Decoding processes (per process under torchrun)."})
    keep_frames: float = field(default=4.0, metadata={  # extract/data.py KeptClips; the same batches either way
        "help": "GiB of decoded training frames kept in memory: when every training video's frames fit, each "
                "video is decoded once, not once per caption per epoch (0: decode every epoch)."})
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    amp: bool = field(default=True, metadata={"help": "Mixed precision (GPU only)."})
    grad_checkpointing: bool = field(default=False, metadata={
        "show_default": "off",
        "help": "Recompute activations in backward: much less GPU memory, about a third slower."})
    shard_rows: int = field(default=4096, metadata={"hidden": True, "help": "Rows per HDF5 shard."})
    decode_timeout: float | None = field(default=60.0, metadata={  # None: decode in-process, unbounded
        "help": "Seconds one video may take to decode before it is recorded as a failure."})
    stage1: str | None = field(default=None, metadata={
        "path": "file", "parse": str, "show_default": "fine-tune a new one",
        "help": "Dump with this existing stage-1 checkpoint (a cache's stage1.pt), without fine-tuning; --model and "
                "--pretrained are taken from it."})

    def __post_init__(self):
        check_numbers(self, NUMBER_RULES)
        if self.loss not in LOSSES:
            raise ValueError(f"unknown loss {self.loss!r}; known: {', '.join(LOSSES)}")
        if self.frames < 1 or self.words < 3:
            raise ValueError(f"need --frames >= 1 and --words >= 3, got {self.frames} and {self.words}")
        if self.batch_size < 2 and self.epochs > 0:
            raise ValueError(f"contrastive fine-tuning needs --batch-size >= 2, got {self.batch_size}")
        self.adam_betas = tuple(self.adam_betas)
        check_padding(self.wti_padding)
        check_sampling(self.frame_rule, self.target_fps, self.end_second)
        for name, known in (("recipe", RECIPES), ("select_on", SELECT_ON)):
            if getattr(self, name) not in known:
                raise ValueError(f"unknown {name.replace('_', '-')} {getattr(self, name)!r}; known: {', '.join(known)}")
        if self.frame_padding not in FRAME_PADDINGS:
            raise ValueError(f"unknown frame padding {self.frame_padding!r}; known: {', '.join(FRAME_PADDINGS)}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ExtractConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


# Fields that decide the fine-tuned weights; a run may only resume or reuse a stage-1
# checkpoint whose values for these match. (workers, keep_frames, device, amp, grad_checkpointing and
# shard_rows change speed or memory, not the recipe.)
TRAINING_FIELDS = (
    "dataset", "data_root", "video_dir", "model", "pretrained", "frames", "words", "target_fps", "epochs",
    "batch_size", "lr", "clip_lr_scale", "weight_decay", "adam_betas", "adam_eps", "warmup", "grad_clip",
    "loss", "dsl_temp", "temporal_layers", "seed",
    "wti_padding",  # the similarity the loss trains (and the cache is scored by)
    "frame_rule", "end_second",  # which frames are decoded
    "frame_padding",  # the dumped padded slots only (never the weights): a resumed dump must not mix two kinds
    "recipe", "select_on",
)
SELECTION_FIELDS = ("val_fraction", "eval_every", "ema")  # decide the weights only with select_on "val"
# What a config written before a field existed meant (the recipe then was AdamW; the last epoch was kept).
LEGACY = {"recipe": "modern", "select_on": "last"}


def recipe_mismatch(saved: dict, cfg: ExtractConfig) -> str | None:
    """The first training field where `saved` (a config dict) differs from `cfg`, as a phrase; else None."""
    now, saved = cfg.to_dict(), {**LEGACY, **saved}
    names = TRAINING_FIELDS + (SELECTION_FIELDS if now["select_on"] == "val" == saved["select_on"] else ())
    for name in names:
        a, b = saved.get(name), now.get(name)
        if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
            a, b = list(a), list(b)
        if a != b:
            return f"{name} was {a!r}, now {b!r}"
    return None
