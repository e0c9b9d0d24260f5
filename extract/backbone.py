"""The open_clip backbone: building the model, the project's tiny config, and loading weights.

`--pretrained` takes an open_clip tag (`openai`, fetched by open_clip where the network
allows), a local checkpoint path (a state dict, open_clip's or OpenAI's layout), or `none`
for random initialisation (the demo and the tests use the tiny config that way).

Activation (`choose_activation`): OpenAI's CLIP was trained with QuickGELU (x * sigmoid(1.702 x)),
so OpenAI weights always run with it: a tag whose open_clip entry says quick_gelu (`openai`), a
local file in OpenAI's layout (a TorchScript archive, or a state dict with OpenAI's top-level
`input_resolution` / `context_length` / `vocab_size` entries), or a `*-quickgelu` model name.
Everything else follows the model name's config (plain GELU for `ViT-B-32` and `tiny`).
`activation_of` reads it back from the built modules: that is what is recorded and fingerprinted.
"""
from __future__ import annotations

import logging
import os
import zipfile
from contextlib import contextmanager
from pathlib import Path

import open_clip
import torch
from open_clip.transformer import QuickGELU
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


ACTIVATIONS = ("quick_gelu", "gelu")
OPENAI_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")  # top-level entries of OpenAI's files


def activation_of(module: nn.Module) -> str:
    """The MLP activation of the transformer blocks in `module` (a CLIP or a whole stage-1 model):
    "quick_gelu" (open_clip's QuickGELU), "gelu" (nn.GELU), "gelu+quick_gelu" if mixed, "none"."""
    kinds = set()
    for m in module.modules():
        if isinstance(m, QuickGELU):
            kinds.add("quick_gelu")
        elif isinstance(m, nn.GELU):
            kinds.add("gelu")
    return "+".join(sorted(kinds)) or "none"


def act_layer(activation: str) -> type[nn.Module]:
    """The module class of an activation name ("quick_gelu" -> QuickGELU, "gelu" -> nn.GELU)."""
    if activation not in ACTIVATIONS:
        raise BackboneError(f"unknown activation {activation!r}; known: {', '.join(ACTIVATIONS)}")
    return QuickGELU if activation == "quick_gelu" else nn.GELU


def name_activation(name: str) -> str:
    """The activation the open_clip config `name` builds without overrides (`*-quickgelu` -> quick_gelu)."""
    cfg = open_clip.get_model_config(name) or {}
    return "quick_gelu" if cfg.get("quick_gelu", False) else "gelu"


def _is_path(pretrained: str) -> bool:
    return os.path.sep in str(pretrained) or str(pretrained).endswith((".pt", ".pth", ".bin", ".safetensors"))


def is_torchscript_archive(path: Path) -> bool:
    """A TorchScript archive (how OpenAI ships CLIP): a zip whose records include constants.pkl."""
    try:
        with zipfile.ZipFile(path) as z:
            return any(n.rsplit("/", 1)[-1] == "constants.pkl" for n in z.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def is_openai_file(path: Path) -> bool:
    """Whether a local checkpoint is in OpenAI's layout: a TorchScript archive, or a state dict
    (optionally under "state_dict", keys optionally prefixed "module.") carrying OpenAI's
    top-level input_resolution / context_length / vocab_size entries."""
    path = Path(path)
    if is_torchscript_archive(path):
        return True
    try:
        if path.name.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                keys = set(f.keys())
        else:
            try:  # mmap: only the keys are needed, not the tensors
                obj = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
            except RuntimeError:  # the legacy (non-zip) format cannot be memory-mapped
                obj = torch.load(path, map_location="cpu", weights_only=False)
            if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
                obj = obj["state_dict"]
            keys = {k[7:] if k.startswith("module.") else k for k in obj} if isinstance(obj, dict) else set()
    except Exception as e:
        why = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise BackboneError(f"cannot read {path}: {why}") from None
    return any(k in keys for k in OPENAI_EXTRA_KEYS)


def choose_activation(name: str, pretrained: str | None) -> str:
    """The activation the weights named by (model name, --pretrained) were trained with.

    quick_gelu for a `*-quickgelu` config, a tag whose open_clip entry says quick_gelu (`openai`)
    and a local file in OpenAI's layout (`is_openai_file`); else the model name's config (gelu).
    """
    by_name = name_activation(name)
    if by_name == "quick_gelu" or _no_weights(pretrained):
        return by_name
    if _is_path(pretrained):
        path = Path(pretrained)
        if not path.is_file():
            raise BackboneError(f"checkpoint file {path} does not exist")
        return "quick_gelu" if is_openai_file(path) else by_name
    from open_clip.pretrained import get_pretrained_cfg

    return "quick_gelu" if get_pretrained_cfg(name, str(pretrained)).get("quick_gelu", False) else by_name


def build_clip(name: str = "ViT-B-32", pretrained: str | None = "openai", activation: str | None = None) -> nn.Module:
    """Build an open_clip CLIP model; raise BackboneError with a fix when weights are missing.

    `activation` ("quick_gelu" | "gelu") overrides `choose_activation` (a stage-1 checkpoint
    rebuilds with the one it recorded); a `*-quickgelu` config cannot be built with gelu.
    """
    if name not in open_clip.list_models():
        raise BackboneError(f"unknown open_clip model {name!r} (try ViT-B-32, ViT-B-16 or tiny)")
    if activation is not None:
        act_layer(activation)  # validates the name
        if activation == "gelu" and name_activation(name) == "quick_gelu":
            raise BackboneError(f"{name} is a QuickGELU config; it cannot be built with gelu")
    with _quiet_open_clip():
        return _build(name, pretrained, activation)


def _build(name: str, pretrained: str | None, activation: str | None) -> nn.Module:
    if _no_weights(pretrained):
        quick = (activation or name_activation(name)) == "quick_gelu"
        return open_clip.create_model(name, pretrained=None, force_quick_gelu=quick)
    if _is_path(pretrained):
        path = Path(pretrained)
        quick = (activation or choose_activation(name, str(path))) == "quick_gelu"
        model = open_clip.create_model(name, pretrained=None, force_quick_gelu=quick)
        load_weights(model, path)
        return model
    tags = open_clip.list_pretrained_tags_by_model(name)
    if pretrained not in tags:
        raise BackboneError(f"{name} has no pretrained tag {pretrained!r}; known tags: {', '.join(tags) or 'none'}")
    quick = (activation or choose_activation(name, pretrained)) == "quick_gelu"
    try:
        return open_clip.create_model(name, pretrained=pretrained, force_quick_gelu=quick)
    except Exception as e:  # open_clip raises RuntimeError for a failed download
        raise BackboneError(
            f"could not fetch {name} weights {pretrained!r} ({str(e).splitlines()[0][:120]}); "
            f"download them where the network allows and pass --pretrained /path/to/weights.pt"
        ) from None


def load_weights(model: nn.Module, path: Path) -> None:
    """Load a local CLIP checkpoint (open_clip or OpenAI layout: a TorchScript archive or a state
    dict, optionally under 'state_dict'). OpenAI's input_resolution / context_length / vocab_size
    entries are not weights: the only keys allowed not to fit."""
    try:
        bad = open_clip.load_checkpoint(model, str(path), strict=False, weights_only=False)
    except Exception as e:
        raise BackboneError(f"cannot load {path} into {type(model).__name__}: {str(e).splitlines()[0][:200]}") from None
    if not hasattr(bad, "missing_keys"):  # big_vision .npz weights: open_clip checks them itself
        return
    unexpected = [k for k in bad.unexpected_keys if k not in OPENAI_EXTRA_KEYS]
    if bad.missing_keys or unexpected:
        first = f"{bad.missing_keys[0]} is missing" if bad.missing_keys else f"{unexpected[0]} is unexpected"
        raise BackboneError(f"cannot load {path} into {type(model).__name__}: {first} "
                            f"({len(bad.missing_keys)} missing, {len(unexpected)} unexpected keys)")


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
