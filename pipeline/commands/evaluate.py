"""`diffret evaluate`: retrieval metrics (options: pipeline/evaluate.py EvalOptions)."""
from __future__ import annotations

import json
from pathlib import Path

import click

from diffret.cache.atomic import atomic_write_text
from diffret.cache.paths import check_output_path

from ..evaluate import EvalOptions, evaluate, unfinished_warning
from .errors import clear_errors
from .options import cache_option, config, options
from .output import console, out_console, progress_bar, results_table

SCORING = ("sample_steps", "sampler", "clamp", "ddim_eps", "top_k", "alpha", "temp", "dsl", "dsl_temp", "qb_norm",
           "qb_beta", "qb_k", "split", "allow_other_cache")


@click.command("evaluate")
@cache_option
@click.option("--generator", "generator_dir", type=click.Path(path_type=Path),
              help="Generator run folder (without one: the stage-1 row and the revisers only).")
@options(EvalOptions, SCORING)
@click.option("--save-sims", type=click.Path(path_type=Path), help="Save every row's score matrices here (.npz).")
@options(EvalOptions, ("memory_budget", "device", "seed"))
@click.option("--json", "json_out", type=click.Path(path_type=Path), help="Write the metrics here.")
def command(cache_dir, generator_dir, save_sims, json_out, **values):
    """Retrieval metrics in both directions: stage-1 scores, their diffusion re-ranking, DSL, QB-Norm."""
    with clear_errors():
        opts = config(EvalOptions, values)
        if json_out:  # refused before the work, not after it (--save-sims: evaluate checks it)
            check_output_path(json_out, "--json", folder=False)
        with progress_bar() as p:
            report = evaluate(cache_dir, generator_dir, opts, progress=p, save_sims_to=save_sims)
    title = f"{report['n_queries']} queries x {report['n_candidates']} videos"
    if "steps" in report:
        title += f", top-{report['top_k']}, {report['steps']} {report['sampler'].upper()} steps"
    out_console.print(results_table(f"{title} ({report['seconds']} s)", report["results"]))
    if warning := unfinished_warning(report, generator_dir):  # also recorded in the JSON: "unfinished": true
        console.print(warning, style="yellow", markup=False, highlight=False, soft_wrap=True)
    if save_sims:
        console.print(f"score matrices written to {save_sims}")
    if json_out:
        with clear_errors():  # standard JSON: a NaN or inf is an error, never written as NaN / Infinity
            text = json.dumps(report, indent=2, allow_nan=False) + "\n"
            Path(json_out).parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(Path(json_out), text)
        console.print(f"metrics written to {json_out}")
