"""`diffret sweep`: a grid of stage-2 runs (options: pipeline/sweep.py SweepGrid, with GeneratorConfig's
and EvalOptions' for the settings every run shares)."""
from __future__ import annotations

from pathlib import Path

import click
from rich.table import Table

from diffret.generator.config import GeneratorConfig

from ..evaluate import EvalOptions
from ..sweep import SweepGrid, run_sweep
from .errors import clear_errors
from .options import cache_option, config, options
from .output import console, out_console, progress_bar

SHARED = ("epochs", "candidates", "batch_size", "lr")


@click.command("sweep")
@cache_option
@click.option("--out", required=True, type=click.Path(path_type=Path),
              help="Sweep folder (generators, CSV, JSON, PNG).")
@options(SweepGrid, ("steps", "schedules", "losses", "samplers", "seeds"))
@options(GeneratorConfig, SHARED, overrides={"candidates": {"help": None}})
@options(EvalOptions, ("top_k",), overrides={"top_k": {"help": "Candidates re-ranked per query at evaluation.",
                                                       "parse": None, "format": None}})
@options(GeneratorConfig, ("device",))
def command(cache_dir, out, **values):
    """Grid of stage-2 runs on one cache: a CSV/JSON table, a printed table and a plot of R@1 against T."""
    with clear_errors():
        grid, base, opts = config(SweepGrid, values), config(GeneratorConfig, values), config(EvalOptions, values)
        with progress_bar() as p:
            report = run_sweep(cache_dir, out, grid, base, opts, progress=p, log=console.print)
    table = Table(title=f"sweep on {cache_dir}: R@1 / Rsum, top-{opts.top_k}, all T sampling steps "
                        f"({report['seconds']} s)")
    for col in ("schedule", "T", "loss", "sampler", "seed", "t2v R@1", "v2t R@1", "Rsum"):
        table.add_column(col, justify="right" if col in ("T", "seed", "t2v R@1", "v2t R@1", "Rsum") else "left")
    d = report["discriminative"]
    table.add_row("discriminative", "", "", "", "", f"{d['t2v_R@1']:.1f}", f"{d['v2t_R@1']:.1f}", f"{d['Rsum']:.1f}")
    for r in report["rows"]:
        table.add_row(r["schedule"], str(r["steps"]), r["loss"], r["sampler"], str(r["seed"]), f"{r['t2v_R@1']:.1f}",
                      f"{r['v2t_R@1']:.1f}", f"{r['Rsum']:.1f}")
    out_console.print(table)
    console.print(f"wrote {report['files']['csv']}, {report['files']['json']} and {report['files']['png']}")
