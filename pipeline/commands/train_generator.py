"""`diffret train-generator`: stage 2 (options: generator/config.py GeneratorConfig)."""
from __future__ import annotations

from pathlib import Path

import click

from diffret.generator.config import GeneratorConfig

from .errors import clear_errors
from .options import cache_option, config, options, typed
from .output import console, progress_bar

TRAINING = ("epochs", "train_steps", "schedule", "beta_scale", "loss", "x0", "candidates", "negatives", "batch_size",
            "lr", "ema", "recipe", "select_on", "val_fraction", "eval_every", "device", "seed")


@click.command("train-generator")
@cache_option
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Generator run folder to write.")
@options(GeneratorConfig, TRAINING)
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last finished epoch.")
@click.option("--overwrite", is_flag=True, show_default="off",
              help="Start over: replace a generator already in --out (only its own files are removed).")
def command(cache_dir, out, resume, overwrite, **values):
    """Stage 2: train the t2v and v2t denoisers on cached features only."""
    from diffret.generator.trainer import resume_config, train_generator

    with clear_errors():
        # --resume: the saved settings, plus the options given on this command line
        cfg = resume_config(out, typed(values)) if resume else config(GeneratorConfig, values)
        selection = None
        if cfg.select_on == "val":  # the validation split and its selector (never the test split)
            from diffret.pipeline.selection import GeneratorSelection

            selection = GeneratorSelection(cache_dir, cfg, log=console.print)
        with progress_bar() as p:
            meta = train_generator(cache_dir, out, cfg, progress=p, log=console.print, resume=resume,
                                   overwrite=overwrite, selection=selection)
    console.print(f"generator written to {out}: width {meta['width']}, parameters {meta['parameters']}, "
                  f"loss per epoch {meta['history']}, {meta['seconds']} s")
    if (meta.get("selection") or {}).get("best"):
        console.print(f"kept the best on validation: {meta['selection']['best']}")
