"""Generator run folders: `generator.pt` (both denoisers' weights) and `generator.json` (config,
width, parameter counts, the cache it was trained on). Both are written atomically."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from diffret.cache.atomic import atomic_open, atomic_write_text

from .config import GeneratorConfig
from .denoiser import T2VDenoiser, V2TDenoiser
from .generator import Generator

WEIGHTS_NAME = "generator.pt"
META_NAME = "generator.json"


class GeneratorError(RuntimeError):
    """A generator folder that is missing or unreadable (one-line message)."""


def save_generator(out: Path, t2v: nn.Module, v2t: nn.Module, meta: dict) -> None:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_open(out / WEIGHTS_NAME) as fh:
        torch.save({"t2v": t2v.state_dict(), "v2t": v2t.state_dict(), "meta": meta}, fh)
    atomic_write_text(out / META_NAME, json.dumps(meta, indent=2) + "\n")


def load_generator(folder: Path, device="cpu") -> Generator:
    """-> the Generator in `folder`, both denoisers in eval mode on `device`."""
    folder = Path(folder)
    path = folder / WEIGHTS_NAME
    if not path.is_file():
        raise GeneratorError(f"{folder} holds no trained generator ({WEIGHTS_NAME} is missing)")
    try:
        state = torch.load(path, map_location=device, weights_only=False)
        meta = state["meta"]
    except Exception as e:  # truncated, foreign or corrupted file
        raise GeneratorError(f"cannot read {path}: {str(e).splitlines()[0][:160]}") from None
    cfg = GeneratorConfig.from_dict(meta["config"])
    t2v, v2t = T2VDenoiser(meta["width"], cfg.temp), V2TDenoiser(meta["width"], cfg.temp)
    t2v.load_state_dict(state["t2v"])
    v2t.load_state_dict(state["v2t"])
    return Generator(cfg, t2v.to(device).eval(), v2t.to(device).eval(), meta)


STATE_NAME = "train_state.pt"


def save_train_state(out: Path, state: dict) -> None:
    """Everything `train-generator --resume` needs (raw and EMA weights, optimizer, RNG, history)."""
    with atomic_open(Path(out) / STATE_NAME) as fh:
        torch.save(state, fh)


def load_train_state(folder: Path) -> dict:
    path = Path(folder) / STATE_NAME
    if not path.is_file():
        raise GeneratorError(f"nothing to resume in {folder}: {STATE_NAME} is missing (run without --resume)")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # a truncated or foreign file
        raise GeneratorError(f"cannot read {path}: {str(e).splitlines()[0][:160]}") from None
