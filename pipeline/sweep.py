"""`diffret sweep`: a grid of stage-2 runs on one cache, written as a table and a plot.

For every (schedule, steps T, loss, seed) a generator is trained (or reused when its folder already
holds a finished run with the same settings), then evaluated with every sampler over all T steps.
The stage-1 scores are computed once. Output folder:

    generators/<schedule>-T<steps>-<loss>-s<seed>/   the trained generators
    sweep.csv, sweep.json                             one row per (run, sampler), plus the stage-1 row
    sweep.png                                         R@1 against T (log axis), a line per schedule
"""
from __future__ import annotations

import csv
import json
import time
from dataclasses import asdict, dataclass, field, replace
from itertools import product
from pathlib import Path

from diffret.generator.checkpoint import load_generator
from diffret.generator.config import GeneratorConfig
from diffret.generator.trainer import resolve_device, train_generator

from .evaluate import EvalOptions, diffusion_row, load_eval_data, protocol_metrics

METRICS = ("R@1", "R@5", "R@10", "MdR", "MnR")


@dataclass
class SweepGrid:
    """The axes of the grid (the paper's ablations): every combination is one run."""

    steps: list[int] = field(default_factory=lambda: [10, 50, 100, 1000])
    schedules: list[str] = field(default_factory=lambda: ["cosine", "linear"])
    losses: list[str] = field(default_factory=lambda: ["ce"])
    samplers: list[str] = field(default_factory=lambda: ["ddim"])
    seeds: list[int] = field(default_factory=lambda: [0])

    def runs(self) -> list[tuple[str, int, str, int]]:
        """(schedule, steps, loss, seed) of every generator to train."""
        return list(product(self.schedules, self.steps, self.losses, self.seeds))


def flat(metrics: dict) -> dict:
    """{"t2v": {...}, "v2t": {...}, "Rsum"} -> {"t2v_R@1": ..., ..., "Rsum": ...} (rounded)."""
    row = {f"{d}_{m}": round(metrics[d][m], 2) for d in ("t2v", "v2t") for m in METRICS}
    row["Rsum"] = round(metrics["Rsum"], 2)
    return row


def _finished(folder: Path, cfg: GeneratorConfig) -> bool:
    try:
        meta = json.loads((folder / "generator.json").read_text())
    except (OSError, ValueError):
        return False
    return GeneratorConfig.from_dict(meta["config"]) == cfg and meta.get("epochs_done", 0) >= cfg.epochs


def run_sweep(cache_dir: Path, out: Path, grid: SweepGrid, base: GeneratorConfig, opts: EvalOptions | None = None,
              progress=None, log=print) -> dict:
    """Train and evaluate every run of `grid` -> {"discriminative", "rows", "files", ...}; writes `out`."""
    t0 = time.time()
    out = Path(out)
    opts = opts or EvalOptions()
    for s in grid.steps:
        if s < 1:
            raise ValueError(f"--steps values must be >= 1, got {s}")
    for name in grid.samplers:
        if name not in ("ddim", "ddpm"):
            raise ValueError(f"unknown sampler {name!r}; expected ddim or ddpm")
    for (schedule, steps, loss, seed) in grid.runs():  # fail on a bad value before any training
        replace(base, schedule=schedule, steps=steps, loss=loss, seed=seed).validate()
    dev = resolve_device(opts.device)
    data = load_eval_data(cache_dir, opts.split, dev)
    S, cv = data.scores, data.features.caption_video
    disc = protocol_metrics(S, S.t(), cv)
    rows = []
    runs = grid.runs()
    task = progress.add_task("sweep", total=len(runs)) if progress else None
    for i, (schedule, steps, loss, seed) in enumerate(runs):
        cfg = replace(base, schedule=schedule, steps=steps, loss=loss, seed=seed)
        folder = out / "generators" / f"{schedule}-T{steps}-{loss}-s{seed}"
        t1 = time.time()
        if _finished(folder, cfg):
            log(f"reusing {folder}")
        else:
            train_generator(cache_dir, folder, cfg, progress=progress, log=log)
        train_s = time.time() - t1
        gcfg, t2v, v2t, _ = load_generator(folder, dev)
        for sampler in grid.samplers:
            t1 = time.time()
            o = replace(opts, sampler=sampler, steps=None, seed=seed)
            s_t2v, s_v2t, _ = diffusion_row(data, gcfg, t2v, v2t, o, dev)
            rows.append({"schedule": schedule, "steps": steps, "loss": loss, "sampler": sampler, "seed": seed,
                         **flat(protocol_metrics(s_t2v, s_v2t, cv)), "train_s": round(train_s, 1),
                         "eval_s": round(time.time() - t1, 1)})
        if progress:
            progress.update(task, completed=i + 1)
    if progress:
        progress.remove_task(task)
    out.mkdir(parents=True, exist_ok=True)
    files = {"csv": str(out / "sweep.csv"), "json": str(out / "sweep.json"), "png": str(out / "sweep.png")}
    report = {"cache": str(cache_dir), "grid": asdict(grid), "base": base.to_dict(),
              "eval": {"top_k": opts.top_k, "alpha": opts.alpha, "temp": opts.temp, "clamp": opts.clamp,
                       "ddim_eps": opts.ddim_eps, "split": opts.split, "sample_steps": "all T"},
              "discriminative": flat(disc), "rows": rows, "files": files, "seconds": round(time.time() - t0, 1)}
    write_csv(Path(files["csv"]), report)
    tmp = out / ".sweep.json.tmp"
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(files["json"])
    plot(Path(files["png"]), report)
    return report


def write_csv(path: Path, report: dict) -> None:
    """One line per (run, sampler); the first line is the stage-1 row (schedule `discriminative`)."""
    keys = ["schedule", "steps", "loss", "sampler", "seed"] + list(report["discriminative"]) + ["train_s", "eval_s"]
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=keys, restval="")
        w.writeheader()
        w.writerow({"schedule": "discriminative", **report["discriminative"]})
        for row in report["rows"]:
            w.writerow(row)
    tmp.replace(path)


def plot(path: Path, report: dict) -> None:
    """R@1 (t2v and v2t, mean over seeds) against T, a line per schedule (and loss/sampler when varied)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, grid = report["rows"], report["grid"]
    extra = [k for k, axis in (("loss", "losses"), ("sampler", "samplers")) if len(grid[axis]) > 1]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharex=True)
    for ax, d in zip(axes, ("t2v", "v2t")):
        lines: dict[str, dict[int, list[float]]] = {}
        for r in rows:
            label = "/".join([r["schedule"]] + [str(r[k]) for k in extra])
            lines.setdefault(label, {}).setdefault(r["steps"], []).append(r[f"{d}_R@1"])
        for label, pts in sorted(lines.items()):
            xs = sorted(pts)
            ax.plot(xs, [sum(pts[x]) / len(pts[x]) for x in xs], marker="o", label=label)
        ax.axhline(report["discriminative"][f"{d}_R@1"], color="grey", linestyle="--", label="discriminative")
        ax.set_xscale("log")
        ax.set_xlabel("diffusion steps T")
        ax.set_ylabel(f"{d} R@1 (%)")
        ax.set_title(f"{d} R@1 against T")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)
