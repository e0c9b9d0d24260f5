"""How far CLIP moves in stage one, under `--recipe original` and `--recipe modern`, in one run.

On the demo set (rendered here, or --data), each recipe fine-tunes the stage-1 model from the SAME
initial weights (the tiny open_clip config trained from scratch, `--pretrained none`, seeded), at
two CLIP learning rates: the paper's (lr 1e-4, CLIP x 1e-3 = 1e-7) and the demo's (lr 1e-3, CLIP
x 1). For CLIP (the towers, not the new modules) it reports:

    weights   ||W1 - W0|| / ||W0|| over all of CLIP's weights, and over the float16 set (the
              original's convert_weights: conv / linear / attention weights, projections); and the
              share of the float16 set's entries that changed at all (beyond their first rounding)
    features  mean over probes of ||f1 - f0|| / ||f0||: text = CLIP's EOT sentence feature of each
              test caption, image = CLIP's CLS feature of each sampled test frame (before the
              temporal transformer: CLIP's own features)

A third row, original-float32 (a diagnostic, not an option), runs the original recipe with CLIP
in float32: the difference to `original` is float16's alone.

What the figure means: the tiny model starts from random weights, so this measures the optimiser
arithmetic of each recipe (BertAdam on float16 weights, with conv1 frozen, vs AdamW in float32)
over the same gradients' scale, not how far a pretrained ViT-B/32 would move: its weights, their
gradients and so their rounding differ. At the paper's CLIP lr of 1e-7, float16 rounds away most
updates of weights above ~2e-4 (half an ulp of float16 at |w|), except where g^2 underflows and
BertAdam's update becomes m / eps.

Usage: python benchmarks/clip_drift.py [--out runs/clip-drift] [--train 200 --test 40] [--epochs 2]
       [--batch-size 32] [--data DIR]   (writes OUT/clip_drift.json and OUT/clip_drift.md)
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from diffret.extract.annotations import load_annotations
from diffret.extract.backbone import get_tokenizer
from diffret.extract.checkpoint import build_stage1, seed_everything
from diffret.extract.config import ExtractConfig
from diffret.extract.data import video_loader
from diffret.extract.finetune import stage1_model
from diffret.extract.recipe import half_parameters
from diffret.extract.video import normalize
from diffret.pipeline.recipes import stage1_hooks

SETTINGS = {"paper lr (CLIP 1e-7)": dict(lr=1e-4, clip_lr_scale=1e-3),
            "demo lr (CLIP 1e-3)": dict(lr=1e-3, clip_lr_scale=1.0)}


def clip_features(model, tokens, frames_batches, spec) -> tuple[torch.Tensor, torch.Tensor]:
    """CLIP's own features: EOT sentence [Nt, D] of `tokens`, CLS [Nf, D] of every real sampled frame."""
    model.eval()
    mean, std = torch.tensor(spec.mean), torch.tensor(spec.std)
    with torch.no_grad():
        text = torch.cat([model.encode_text(t)["sentence"] for t in tokens.split(256)])
        image = torch.cat([model.clip.encode_image(normalize(f, mean, std)[m]).float() for f, m in frames_batches])
    return text, image


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    """mean over rows of ||a - b|| / ||b||."""
    return float(((a - b).norm(dim=-1) / b.norm(dim=-1).clamp(min=1e-12)).mean())


def drift(w0: dict, model, names_half: set) -> dict:
    w1 = {n: p.detach() for n, p in model.clip.named_parameters()}
    num = sum(float((w1[n] - w0[n]).pow(2).sum()) for n in w0)
    den = sum(float(w0[n].pow(2).sum()) for n in w0)
    num_h = sum(float((w1[n] - w0[n]).pow(2).sum()) for n in names_half)
    den_h = sum(float(w0[n].pow(2).sum()) for n in names_half)
    # share of the float16 set's entries that moved by more than their first rounding to float16 (the
    # token embedding, 90% of the tiny model's weights, gets gradients only in the rows of used tokens)
    moved = sum(int((w1[n] != w0[n].half().float()).sum()) for n in names_half)
    changed = moved / sum(w0[n].numel() for n in names_half)
    return {"weights": (num / den) ** 0.5, "weights_float16_set": (num_h / den_h) ** 0.5, "changed": changed}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("runs/clip-drift"))
    ap.add_argument("--data", type=Path, help="an existing demo set (else rendered into OUT/data)")
    ap.add_argument("--train", type=int, default=200)
    ap.add_argument("--test", type=int, default=40)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=1)
    a = ap.parse_args(argv)
    t_start, load_before = time.time(), os.getloadavg()
    data = a.data or a.out / "data"
    if not (data / "demo.json").is_file():
        from diffret.pipeline.demo import make_demo_dataset

        make_demo_dataset(data, n_train=a.train, n_test=a.test, workers=max(1, a.workers))
    ann = load_annotations("msrvtt", data)
    base = dict(dataset="msrvtt", data_root=str(data.resolve()), model="tiny", pretrained="none", epochs=a.epochs,
                batch_size=a.batch_size, target_fps=None, workers=a.workers, seed=a.seed, device="cpu")
    tokenizer = get_tokenizer("tiny")
    cfg0 = ExtractConfig(**base)
    seed_everything(a.seed)
    init, spec = build_stage1(cfg0)  # what stage1_model builds first from the same seed
    w0 = {n: p.detach().clone() for n, p in init.clip.named_parameters()}
    half_ids = {id(p) for p in half_parameters(init.clip)}
    names_half = {n for n, p in init.clip.named_parameters() if id(p) in half_ids}
    test = ann.split("test")
    tokens = tokenizer([c.text for c in test], context_length=cfg0.words)
    paths = [ann.videos[v] for v in ann.video_ids("test")]
    frames = [(f, m) for f, m, _, _ in video_loader(paths, spec, 16, a.workers, timeout=60.0)]
    t0, i0 = clip_features(init, tokens, frames, spec)
    rows = []
    import diffret.extract.finetune as finetune

    for setting, lrs in SETTINGS.items():
        for recipe in ("original", "original-float32", "modern"):
            # original-float32 (a diagnostic, no option): the original recipe with CLIP kept in float32,
            # which separates float16's effect from BertAdam's and the decay groups'
            finetune.half_parameters = (lambda clip: []) if recipe == "original-float32" else half_parameters
            cfg = ExtractConfig(**base, **lrs, recipe=recipe.split("-")[0])
            t = time.time()
            model, _, _, _ = stage1_model(cfg, a.out / "runs" / f"{recipe}-{lrs['lr']:g}-{lrs['clip_lr_scale']:g}", ann,
                                          tokenizer, torch.device("cpu"), hooks=stage1_hooks(), log=lambda *x: None)
            conv1, c0 = model.clip.visual.conv1.weight.detach(), w0["visual.conv1.weight"]
            frozen = c0.half().float() if recipe == "original" else c0
            assert torch.equal(conv1, frozen) == recipe.startswith("original")  # frozen (in float16) or trained
            t1, i1 = clip_features(model, tokens, frames, spec)
            rows.append({"setting": setting, "recipe": recipe, **drift(w0, model, names_half),
                         "text_features": relative(t1, t0), "image_features": relative(i1, i0),
                         "seconds": round(time.time() - t, 1)})
            print(rows[-1], flush=True)
    steps = a.epochs * (len(ann.split("train")) // a.batch_size)
    report = {"rows": rows, "train_captions": len(ann.split("train")), "train_videos": len(ann.video_ids("train")),
              "probe_captions": len(test), "probe_frames": int(i0.shape[0]), "steps": steps, "epochs": a.epochs,
              "batch_size": a.batch_size, "seed": a.seed, "machine": f"{platform.node()} ({os.cpu_count()} CPUs)",
              "torch": torch.__version__, "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "load_average": {"before": load_before, "after": os.getloadavg()},
              "seconds": round(time.time() - t_start, 1), "command": "python " + " ".join(sys.argv)}
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "clip_drift.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = ["| CLIP lr | recipe | weights | float16 set | its entries changed | text features | image features |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['setting']} | {r['recipe']} | {r['weights']:.2e} | {r['weights_float16_set']:.2e} | "
                     f"{100 * r['changed']:.1f}% | {r['text_features']:.2e} | {r['image_features']:.2e} |")
    (a.out / "clip_drift.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return report


if __name__ == "__main__":
    main()
