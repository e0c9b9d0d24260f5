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

from diffret.cache.atomic import atomic_open, atomic_write, atomic_write_text
from diffret.cache.numbers import check_numbers
from diffret.cache.paths import check_output_path
from diffret.generator.checkpoint import load_generator
from diffret.generator.config import GeneratorConfig
from diffret.generator.device import resolve_device
from diffret.generator.losses import LOSS_KINDS
from diffret.generator.sampler import SAMPLERS
from diffret.generator.trainer import train_generator

from .evaluate import EvalOptions, diffusion_row, eval_sampler, load_eval_data
from .metrics import METRICS, retrieval_metrics


def _ints(text: str) -> list[int]:
    """Comma-separated integers -> a list ("10,50" -> [10, 50])."""
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"expected comma-separated integers, got {text!r}") from None


def _names(text: str) -> list[str]:
    """Comma-separated names -> a list ("cosine, linear" -> ["cosine", "linear"])."""
    return [x.strip() for x in text.split(",") if x.strip()]


def _axis(default: list, parse, about: str | None = None):
    """A grid axis: a list, given on the command line comma-separated."""
    return field(default_factory=lambda: list(default),
                 metadata={"parse": parse, "format": lambda v: ",".join(map(str, v)), "help": about})


@dataclass
class SweepGrid:
    """The axes of the grid (the paper's ablations): every combination is one run. Each field's
    metadata is its `diffret sweep` option (see pipeline/commands/options.py)."""

    steps: list[int] = _axis([10, 50, 100, 1000], _ints, "Diffusion steps T to try.")
    schedules: list[str] = _axis(["cosine", "linear"], _names)
    losses: list[str] = _axis(["ce"], _names, f"Any of {','.join(LOSS_KINDS)}.")
    samplers: list[str] = _axis(["ddim"], _names, f"Any of {','.join(SAMPLERS)}.")
    seeds: list[int] = _axis([0], _ints)

    def __post_init__(self):
        check_numbers(self, {"steps": ">=1", "seeds": ">=0"})  # each run's GeneratorConfig checks the rest

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
    opts = replace(opts or EvalOptions())
    grid = replace(grid)  # __post_init__ checks the numbers again (a caller may have changed a list since)
    check_output_path(out, "--out", folder=True)
    for name in grid.samplers:
        if name not in SAMPLERS:
            raise ValueError(f"unknown sampler {name!r}; expected {' or '.join(SAMPLERS)}")
    for (schedule, steps, loss, seed) in grid.runs():  # fail on a bad value before any training
        replace(base, schedule=schedule, train_steps=steps, loss=loss, seed=seed).validate()
    dev = resolve_device(opts.device)
    data = load_eval_data(cache_dir, opts.split, dev)
    S, cv = data.scores, data.features.caption_video
    disc = retrieval_metrics(S, S.t(), cv)
    rows = []
    runs = grid.runs()
    task = progress.add_task("sweep", total=len(runs)) if progress else None
    for i, (schedule, steps, loss, seed) in enumerate(runs):
        cfg = replace(base, schedule=schedule, train_steps=steps, loss=loss, seed=seed)
        folder = out / "generators" / f"{schedule}-T{steps}-{loss}-s{seed}"
        t1 = time.time()
        if _finished(folder, cfg):
            log(f"reusing {folder}")
        else:
            train_generator(cache_dir, folder, cfg, progress=progress, log=log, overwrite=True)  # the sweep's own
        train_s = time.time() - t1
        gen = load_generator(folder, dev)
        for sampler in grid.samplers:
            t1 = time.time()
            o = replace(opts, sampler=sampler, sample_steps=None, seed=seed)
            s_t2v, s_v2t = diffusion_row(data, gen, eval_sampler(gen, o), o, dev)
            rows.append({"schedule": schedule, "steps": steps, "loss": loss, "sampler": sampler, "seed": seed,
                         **flat(retrieval_metrics(s_t2v, s_v2t, cv)), "train_s": round(train_s, 1),
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
    atomic_write_text(Path(files["json"]), json.dumps(report, indent=2, allow_nan=False) + "\n")  # standard JSON
    plot(Path(files["png"]), report)
    return report


def write_csv(path: Path, report: dict) -> None:
    """One line per (run, sampler); the first line is the stage-1 row (schedule `discriminative`)."""
    keys = ["schedule", "steps", "loss", "sampler", "seed"] + list(report["discriminative"]) + ["train_s", "eval_s"]
    with atomic_open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=keys, restval="")
        w.writeheader()
        w.writerow({"schedule": "discriminative", **report["discriminative"]})
        for row in report["rows"]:
            w.writerow(row)


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
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)
