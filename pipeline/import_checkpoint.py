"""`diffret import-checkpoint`: a released DiffusionRet checkpoint as our stage-1 checkpoint and generator.

The original model's state dict holds, with their original names:

    clip.*                                OpenAI CLIP (open_clip's CLIP uses the same names)
    transformerClip.resblocks.N.*         the temporal transformer      -> temporal.blocks.N.*
    frame_position_embeddings.weight      [77, D] frame positions      -> temporal.frame_position_embeddings (first F rows)
    text_weight_fc.{0,2}.*, video_weight_fc.{0,2}.*   the WTI head       (same names)
    diffusion_model.*                     the text->video denoiser      -> generator t2v (same names)
    diffusion_model_v.*                   the video->text denoiser      -> generator v2t (same names)

Output folder: `stage1.pt` (what `diffret extract --stage1` dumps a cache with) and `generator/`
(what `diffret evaluate --generator` reads; its generator.json names the imported stage-1
fingerprint, so it evaluates on caches dumped with that stage-1 checkpoint without extra flags).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from diffret.cache.manifest import SCHEMA_VERSION
from diffret.extract.config import DEFAULT_SLOTS, ExtractConfig
from diffret.generator.checkpoint import save_generator
from diffret.generator.config import GeneratorConfig
from diffret.generator.denoiser import T2VDenoiser, V2TDenoiser, count_parameters

# OpenAI-layout CLIP -> open_clip model name (QuickGELU, as the original) by (vision width, patch size).
KNOWN_MODELS = {(768, 32): "ViT-B-32-quickgelu", (768, 16): "ViT-B-16-quickgelu", (1024, 14): "ViT-L-14-quickgelu"}
OPENAI_EXTRAS = ("clip.input_resolution", "clip.context_length", "clip.vocab_size")  # JIT metadata, not weights
PE_KEYS = ("sequence_pos_encoder.pe", "embed_timestep.sequence_pos_encoder.pe")


@dataclass
class ImportOptions:
    """What the stage-1 part of a released checkpoint does not say about itself. Each field's
    metadata is its `diffret import-checkpoint` option (see pipeline/commands/options.py)."""

    model: str = field(default="auto", metadata={"help": (  # auto: infer_model
        "open_clip name of the CLIP inside; auto: "
        f"{'/'.join(m.removesuffix('-quickgelu') for m in KNOWN_MODELS.values())} (QuickGELU) from the shapes.")})
    frames: int = field(default=DEFAULT_SLOTS[0], metadata={"help": "Frame slots (64 for ActivityNet)."})
    words: int = field(default=DEFAULT_SLOTS[1], metadata={"help": "Word slots (64 for ActivityNet)."})
    dataset: str = field(default=ExtractConfig.dataset, metadata={"help": "Annotation format recorded in stage1.pt."})


class ImportCheckpointError(ValueError):
    """The file is not a DiffusionRet checkpoint we can map (one-line message)."""


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Load a checkpoint file -> flat state dict (unwraps `state_dict`/`model`, strips `module.`)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file {path} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e:
            raise ImportCheckpointError(f"cannot read {path}: {str(e).splitlines()[0][:160]}") from None
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ImportCheckpointError(f"{path} does not hold a state dict (name -> tensor)")
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in obj.items()}


def split_state_dict(sd: dict[str, torch.Tensor]) -> dict:
    """Original names -> {"stage1": our Stage1Model names, "t2v": ..., "v2t": ..., "ignored": [names]}."""
    parts: dict = {"stage1": {}, "t2v": {}, "v2t": {}, "ignored": []}
    for key, value in sd.items():
        if key.startswith("diffusion_model_v."):
            parts["v2t"][key[len("diffusion_model_v."):]] = value
        elif key.startswith("diffusion_model."):
            parts["t2v"][key[len("diffusion_model."):]] = value
        elif key in OPENAI_EXTRAS:
            parts["ignored"].append(key)
        elif key.startswith("clip."):
            parts["stage1"][key] = value
        elif key.startswith("transformerClip.resblocks."):
            parts["stage1"]["temporal.blocks." + key[len("transformerClip.resblocks."):]] = value
        elif key == "frame_position_embeddings.weight":
            parts["stage1"]["temporal.frame_position_embeddings.weight"] = value
        elif key.startswith(("text_weight_fc.", "video_weight_fc.")):
            parts["stage1"][key] = value
        else:
            parts["ignored"].append(key)
    return parts


def denoiser_from_state(part: dict[str, torch.Tensor], cls, name: str):
    """Our denoiser with the original's weights; the positional table (a fixed sinusoid) is taken from
    the checkpoint when its shape matches ours and fills both of our names for it."""
    if "q_proj.weight" not in part:
        raise ImportCheckpointError(f"the checkpoint has no {name}.q_proj.weight")
    model = cls(int(part["q_proj.weight"].shape[0]))
    state = model.state_dict()
    pe = next((part[k] for k in PE_KEYS if k in part), None)
    for key in state:
        if key in PE_KEYS:
            if pe is not None and pe.shape == state[key].shape:
                state[key] = pe
        elif key not in part:
            raise ImportCheckpointError(f"the checkpoint has no {name}.{key}")
        elif part[key].shape != state[key].shape:
            raise ImportCheckpointError(f"{name}.{key} has shape {tuple(part[key].shape)}, "
                                        f"expected {tuple(state[key].shape)}")
        else:
            state[key] = part[key]
    model.load_state_dict(state, strict=True)
    return model.eval()


def infer_model(stage1: dict[str, torch.Tensor]) -> str:
    """The open_clip name of an OpenAI-layout CLIP, from its vision width and patch size."""
    conv = stage1.get("clip.visual.conv1.weight")
    if conv is None:
        raise ImportCheckpointError("the checkpoint has no clip.visual.conv1.weight; pass --model")
    key = (int(conv.shape[0]), int(conv.shape[-1]))
    if key not in KNOWN_MODELS:
        raise ImportCheckpointError(f"unknown CLIP (vision width {key[0]}, patch {key[1]}); pass --model")
    return KNOWN_MODELS[key]


def build_stage1_checkpoint(stage1: dict[str, torch.Tensor], model: str, frames: int, words: int, dataset: str,
                            out: Path) -> tuple[str, str]:
    """Load the mapped weights into our Stage1Model and write `out` (stage1.pt) -> (fingerprint, model)."""
    from diffret.extract.backbone import BackboneError
    from diffret.extract.checkpoint import CheckpointError, build_stage1, save_stage1
    from diffret.extract.model import fingerprint

    name = infer_model(stage1) if model == "auto" else model
    layers = len({int(m.group(1)) for k in stage1 if (m := re.match(r"temporal\.blocks\.(\d+)\.", k))})
    if layers == 0:
        raise ImportCheckpointError("the checkpoint has no transformerClip.resblocks.* (the temporal transformer)")
    cfg = ExtractConfig(dataset=dataset, model=name, pretrained="none", frames=frames, words=words, epochs=0,
                        temporal_layers=layers)
    try:  # every released checkpoint fine-tunes OpenAI's CLIP, which runs QuickGELU, whatever --model says
        net, _ = build_stage1(cfg, activation="quick_gelu")
    except (BackboneError, CheckpointError) as e:
        raise ImportCheckpointError(str(e)) from None
    state = dict(stage1)
    pos = state.get("temporal.frame_position_embeddings.weight")
    if pos is not None:
        if pos.shape[0] < frames:
            raise ImportCheckpointError(f"the checkpoint has {pos.shape[0]} frame positions, fewer than --frames {frames}")
        state["temporal.frame_position_embeddings.weight"] = pos[:frames]
    ls = state.get("clip.logit_scale")
    if ls is not None:
        state["clip.logit_scale"] = ls.reshape(net.clip.logit_scale.shape)
    want = net.state_dict()
    missing = [k for k in want if k not in state]
    unexpected = [k for k in state if k not in want]
    if missing or unexpected:
        first = f"{missing[0]} is missing" if missing else f"{unexpected[0]} is not part of {name}"
        raise ImportCheckpointError(f"the stage-1 weights do not fit {name}: {first} "
                                    f"({len(missing)} missing, {len(unexpected)} unexpected); check --model")
    bad = next((k for k in want if want[k].shape != state[k].shape), None)
    if bad:
        raise ImportCheckpointError(f"{bad} has shape {tuple(state[bad].shape)} but {name} expects "
                                    f"{tuple(want[bad].shape)}; check --model")
    net.load_state_dict(state, strict=True)
    net.eval()
    fp = fingerprint(net)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_stage1(out, net, cfg, fp)
    return fp, name


def import_checkpoint(path: Path, out: Path, opts: ImportOptions | None = None,
                      generator: GeneratorConfig | None = None) -> dict:
    """Write `out/stage1.pt` and `out/generator/` from the original checkpoint `path` -> summary;
    `generator` says how the denoisers were trained (its train_steps and schedule matter)."""
    out, opts = Path(out), opts or ImportOptions()
    parts = split_state_dict(read_state_dict(path))
    if not parts["stage1"] and not parts["t2v"] and not parts["v2t"]:
        raise ImportCheckpointError(f"{path} holds none of the DiffusionRet keys (clip.*, diffusion_model.*, ...)")
    summary: dict = {"source": str(path), "out": str(out), "ignored": parts["ignored"], "stage1": None,
                     "generator": None, "fingerprint": None}
    if parts["stage1"]:
        fp, name = build_stage1_checkpoint(parts["stage1"], opts.model, opts.frames, opts.words, opts.dataset,
                                           out / "stage1.pt")
        summary.update(stage1=str(out / "stage1.pt"), fingerprint=fp, model=name)
    if parts["t2v"] or parts["v2t"]:
        t2v = denoiser_from_state(parts["t2v"], T2VDenoiser, "diffusion_model")
        v2t = denoiser_from_state(parts["v2t"], V2TDenoiser, "diffusion_model_v")
        if t2v.width != v2t.width:
            raise ImportCheckpointError(f"the two denoisers have widths {t2v.width} and {v2t.width}")
        cfg = replace(generator or GeneratorConfig(), epochs=0).validate()
        meta = {"config": cfg.to_dict(), "width": t2v.width,
                "parameters": {"t2v": count_parameters(t2v), "v2t": count_parameters(v2t)},
                "cache": {"path": None, "fingerprint": summary["fingerprint"], "schema_version": SCHEMA_VERSION,
                          "train_captions": None},
                "imported_from": str(path), "epochs_done": 0, "history": [], "seconds": 0.0, "device": "cpu"}
        save_generator(out / "generator", t2v, v2t, meta)
        summary.update(generator=str(out / "generator"), width=t2v.width, parameters=meta["parameters"])
    return summary
