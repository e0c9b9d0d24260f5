"""The open_clip backbone: building the model, the project's tiny config, and loading weights.

`--pretrained` takes an open_clip tag (`openai`, fetched by open_clip where the network
allows), a local checkpoint path (a state dict, open_clip's or OpenAI's layout), or `none`
for random initialisation (the demo and the tests use the tiny config that way).
"""
from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from pathlib import Path

import open_clip
import torch
from torch import nn

CONFIG_DIR = Path(__file__).parent / "model_configs"
open_clip.add_model_config(CONFIG_DIR)  # registers `tiny` next to open_clip's own configs


class BackboneError(RuntimeError):
    """The backbone cannot be built or its weights cannot be loaded (one-line message)."""


@contextmanager
def _quiet_open_clip():
    """open_clip logs through the root logger; its warnings and errors become our one-line errors."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        root.setLevel(level)


def _no_weights(pretrained: str | None) -> bool:
    return pretrained is None or str(pretrained).lower() in ("", "none", "random")


def build_clip(name: str = "ViT-B-32", pretrained: str | None = "openai") -> nn.Module:
    """Build an open_clip CLIP model; raise BackboneError with a fix when weights are missing."""
    if name not in open_clip.list_models():
        raise BackboneError(f"unknown open_clip model {name!r} (try ViT-B-32, ViT-B-16 or tiny)")
    with _quiet_open_clip():
        return _build(name, pretrained)


def _build(name: str, pretrained: str | None) -> nn.Module:
    if _no_weights(pretrained):
        return open_clip.create_model(name, pretrained=None)
    if os.path.sep in str(pretrained) or str(pretrained).endswith((".pt", ".pth", ".bin", ".safetensors")):
        path = Path(pretrained)
        if not path.is_file():
            raise BackboneError(f"checkpoint file {path} does not exist")
        model = open_clip.create_model(name, pretrained=None)
        load_weights(model, path)
        return model
    tags = open_clip.list_pretrained_tags_by_model(name)
    if pretrained not in tags:
        raise BackboneError(f"{name} has no pretrained tag {pretrained!r}; known tags: {', '.join(tags) or 'none'}")
    try:
        return open_clip.create_model(name, pretrained=pretrained)
    except Exception as e:  # open_clip raises RuntimeError for a failed download
        raise BackboneError(
            f"could not fetch {name} weights {pretrained!r} ({str(e).splitlines()[0][:120]}); "
            f"download them where the network allows and pass --pretrained /path/to/weights.pt"
        ) from None


def load_weights(model: nn.Module, path: Path) -> None:
    """Load a local CLIP checkpoint (open_clip or OpenAI layout, optionally under 'state_dict')."""
    try:
        state = open_clip.load_checkpoint(model, str(path), strict=True, weights_only=False)
    except Exception as e:
        raise BackboneError(f"cannot load {path} into {type(model).__name__}: {str(e).splitlines()[0][:200]}") from None
    return state


def clip_mean_std(model: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    cfg = getattr(model.visual, "preprocess_cfg", {}) or {}
    mean = tuple(cfg.get("mean", open_clip.OPENAI_DATASET_MEAN))
    std = tuple(cfg.get("std", open_clip.OPENAI_DATASET_STD))
    return mean, std


def image_size(model: nn.Module) -> int:
    size = model.visual.image_size
    return int(size[0] if isinstance(size, (tuple, list)) else size)


def get_tokenizer(name: str):
    return open_clip.get_tokenizer(name)


def text_tokens(clip: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Per-position text outputs projected to the joint space: [B, L] ids -> [B, L, D].

    Runs the text tower over the first L positions (the causal mask makes each position's
    output independent of later ones, so truncating the context changes nothing before L).
    """
    L = tokens.shape[1]
    cast = clip.transformer.get_cast_dtype()
    x = clip.token_embedding(tokens).to(cast) + clip.positional_embedding[:L].to(cast)
    mask = clip.attn_mask[:L, :L] if clip.attn_mask is not None else None
    x = clip.transformer(x, attn_mask=mask)
    x = clip.ln_final(x)
    proj = clip.text_projection
    if proj is None:
        return x
    return proj(x) if isinstance(proj, nn.Linear) else x @ proj
