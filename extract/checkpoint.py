"""Building the stage-1 model, and its two kinds of checkpoint in the cache folder.

    stage1.pt         the finished stage-1 model: {"config", "fingerprint", "activation", "history",
                      "state_dict"}. Written once fine-tuning is complete; a later run with the same
                      recipe reuses it instead of training again (then only the dump remains).
    train-state.pt    the last finished epoch of an unfinished fine-tuning: model, optimizer,
                      scheduler, AMP scaler, RNG states, epochs done, loss history, activation;
                      `--resume` continues from it. Replaced each epoch; deleted when stage1.pt is written.

Both are written atomically (cache/atomic.py), so a kill never leaves half a file.
"activation" ("quick_gelu" | "gelu") is the MLP activation the weights were written with; a
rebuild uses it, never what the model name and tag would choose now (`recorded_activation`).
"""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from diffret.cache.atomic import atomic_open
from diffret.cache.layout import STAGE1_FILE, TRAIN_STATE_FILE

from .backbone import ACTIVATIONS, activation_of, build_clip, clip_mean_std, image_size, name_activation
from .config import ExtractConfig
from .model import Stage1Model, fingerprint
from .video import FrameSpec

STAGE1_NAME, TRAIN_STATE_NAME = STAGE1_FILE, TRAIN_STATE_FILE  # cache/layout.py: what a cache folder holds


class CheckpointError(RuntimeError):
    """A stage-1 checkpoint that is missing, damaged or does not fit (one-line message)."""


def frame_spec(clip, cfg: ExtractConfig) -> FrameSpec:
    mean, std = clip_mean_std(clip)
    return FrameSpec(n_frames=cfg.frames, size=image_size(clip), target_fps=cfg.target_fps, mean=mean, std=std,
                     rule=cfg.frame_rule, end_second=cfg.end_second)


def _check_words(clip, words: int, model: str) -> None:
    context = int(clip.positional_embedding.shape[0])
    if words > context:
        raise CheckpointError(f"--words {words} exceeds the {context}-token text context of {model}")


def build_stage1(cfg: ExtractConfig, activation: str | None = None) -> tuple[Stage1Model, FrameSpec]:
    """A fresh stage-1 model (CLIP weights from cfg.pretrained) and the frame preprocessing it needs.

    activation: None = what the weights were trained with (backbone.choose_activation); the
    importer of the original's checkpoints passes "quick_gelu" (they all come from OpenAI's CLIP)."""
    clip = build_clip(cfg.model, cfg.pretrained, activation=activation)
    _check_words(clip, cfg.words, cfg.model)
    model = Stage1Model(clip, max_frames=cfg.frames, temporal_layers=cfg.temporal_layers,
                        frame_padding=cfg.frame_padding)
    return model, frame_spec(clip, cfg)


def _load(path: Path) -> dict:
    try:  # mmap: reading the config of a large checkpoint does not read its tensors
        obj = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as e:
        raise CheckpointError(f"cannot read {path}: {str(e).splitlines()[0][:200] if str(e) else type(e).__name__}") from None
    if not isinstance(obj, dict) or "state_dict" not in obj or "config" not in obj:
        raise CheckpointError(f"{path} is not a diffret stage-1 checkpoint")
    return obj


def save_stage1(path: Path, model: Stage1Model, cfg: ExtractConfig, fp: str, history: list | None = None,
                selection: dict | None = None) -> None:
    """`selection`: with --select-on val, which weights were kept and why (the manifest repeats it)."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    with atomic_open(path) as fh:
        torch.save({"config": cfg.to_dict(), "fingerprint": fp, "activation": activation_of(model),
                    "history": list(history or []), "selection": selection, "state_dict": state}, fh)


def recorded_activation(ckpt: dict, where: str | Path) -> str:
    """The activation a stage1.pt / train-state.pt dict was written with.

    Its "activation" entry; a file from before that entry existed was built from its model
    name's config ("quick_gelu" for `*-quickgelu`, else "gelu"), except one fine-tuned from the
    `openai` tag on a GELU config: open_clip < 3 built that with QuickGELU and 3.x with GELU, so
    it is refused (one line) rather than guessed.
    """
    act = ckpt.get("activation")
    if act is not None:
        if act not in ACTIVATIONS:
            raise CheckpointError(f"{where} records an unknown activation {act!r}; known: {', '.join(ACTIVATIONS)}")
        return act
    saved = ckpt.get("config") or {}
    act = name_activation(str(saved.get("model", "")))
    if act == "gelu" and str(saved.get("pretrained", "")).lower() == "openai":
        raise CheckpointError(
            f"{where} predates recorded activations and was fine-tuned from {saved.get('model')} openai, which "
            f"open_clip < 3 ran with QuickGELU and open_clip 3 with GELU; fine-tune it again (--overwrite)")
    return act


def read_stage1(path: Path) -> dict:
    """The raw checkpoint dict (config, fingerprint, history, state_dict) of a stage1.pt."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"stage-1 checkpoint {path} does not exist")
    return _load(path)


def load_stage1(path: Path, cfg: ExtractConfig | None = None) -> tuple[Stage1Model, FrameSpec, str, dict]:
    """Rebuild the model saved in `path` -> (model, frame spec, fingerprint, saved config dict).

    The architecture (open_clip model, frame slots, temporal layers) comes from the checkpoint;
    the frame preprocessing from `cfg` (its frames and words must fit the model) or the saved config.
    The weights are checked against the saved fingerprint.
    """
    ckpt = read_stage1(path)
    saved = ExtractConfig.from_dict(ckpt["config"])
    cfg = cfg or saved
    activation = recorded_activation(ckpt, path)
    clip = build_clip(saved.model, "none", activation=activation)
    _check_words(clip, cfg.words, saved.model)
    if cfg.frames > saved.frames:
        raise CheckpointError(f"--frames {cfg.frames} exceeds the {saved.frames} frame slots of the stage-1 model in {path}")
    model = Stage1Model(clip, max_frames=saved.frames, temporal_layers=saved.temporal_layers,
                        frame_padding=cfg.frame_padding)
    try:
        model.load_state_dict(ckpt["state_dict"], strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{path} does not fit a {saved.model} stage-1 model: {str(e).splitlines()[0][:200]}") from None
    built = activation_of(model)
    if built != activation:  # cannot happen through build_clip; a guard against a mixed rebuild
        raise CheckpointError(f"{path} records activation {activation}, but its {saved.model} rebuild runs {built}")
    legacy = "activation" not in ckpt  # fingerprinted over the weights alone
    fp = fingerprint(model, legacy=legacy)
    if ckpt.get("fingerprint") and ckpt["fingerprint"] != fp:
        raise CheckpointError(f"{path} is damaged: its weights do not match its fingerprint {ckpt['fingerprint']}")
    return model, frame_spec(clip, cfg), fingerprint(model) if legacy else fp, ckpt["config"]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_stage1_config(cfg: ExtractConfig) -> ExtractConfig:
    """With cfg.stage1 set: the model's own fields from that checkpoint (model, pretrained, temporal
    layers, the WTI rule it was trained with, what its padded frame slots hold), no fine-tuning
    (epochs 0); the rest (frames, words, frame sampling, data) from `cfg`. A checkpoint written
    before the WTI rule and frame padding were recorded keeps `cfg`'s."""
    if not cfg.stage1:
        return cfg
    saved = read_stage1(cfg.stage1)["config"]
    d = cfg.to_dict()
    d.update(model=saved["model"], pretrained=saved["pretrained"], temporal_layers=saved["temporal_layers"], epochs=0,
             stage1=str(Path(cfg.stage1).resolve()))
    d.update({k: saved[k] for k in ("wti_padding", "frame_padding") if k in saved})
    return ExtractConfig.from_dict(d)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_train_state(path: Path, model, optimizer, scheduler, scaler, epochs_done: int, history: list,
                     cfg: ExtractConfig, extra: dict | None = None) -> None:
    """scheduler None: BertAdam schedules itself. `extra`: more entries (the EMA copy, the selector's
    state with its best weights), all in the one atomic write of the epoch."""
    with atomic_open(path) as fh:
        torch.save({
            "config": cfg.to_dict(), "epochs_done": epochs_done, "history": list(history),
            "state_dict": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "scaler": scaler.state_dict(), "rng": rng_state(), "activation": activation_of(model), **(extra or {}),
        }, fh)


def read_train_state(path: Path) -> dict:
    obj = _load(Path(path))
    if "optimizer" not in obj or "epochs_done" not in obj:
        raise CheckpointError(f"{path} is not a diffret fine-tuning state")
    return obj


def restore_train_state(state: dict, model, optimizer, scheduler, scaler) -> tuple[int, list]:
    """Load a read_train_state() dict into the live objects -> (epochs done, loss history).

    Refuses (CheckpointError) a state trained with another activation than `model` runs.
    """
    was, now = recorded_activation(state, "the unfinished fine-tuning"), activation_of(model)
    if was != now:
        raise CheckpointError(f"cannot resume: the unfinished fine-tuning ran {was}, this {state['config'].get('model')} "
                              f"model runs {now}; pass --overwrite to start over")
    model.load_state_dict(state["state_dict"])
    optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and state.get("scheduler") is not None:
        scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    set_rng_state(state["rng"])
    return int(state["epochs_done"]), list(state["history"])
