"""`diffret extract`: stage 1 (options: extract/config.py ExtractConfig)."""
from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import click

from diffret.extract.config import ExtractConfig

from .errors import clear_errors
from .options import config, options
from .output import console, progress_bar

SETTINGS = ("model", "pretrained", "stage1", "epochs", "batch_size", "recipe", "lr", "clip_lr_scale", "weight_decay",
            "warmup", "grad_clip", "loss", "wti_padding", "select_on", "val_fraction", "eval_every", "ema", "frames", "words", "target_fps", "frame_rule", "frame_padding",
            "end_second", "workers", "keep_frames", "amp", "grad_checkpointing")  # in --help order, after --out


@click.command("extract")
@options(ExtractConfig, ("dataset", "data_root", "video_dir"))
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Cache folder to write.")
@options(ExtractConfig, SETTINGS)
@click.option("--resume", is_flag=True, show_default="off",
              help="Continue an unfinished fine-tuning in --out from its last finished epoch.")
@options(ExtractConfig, ("device", "seed"))
@click.option("--overwrite", is_flag=True, show_default="off",
              help="Start over: remove diffret's own files in --out (never others': refused) and extract anew.")
@options(ExtractConfig, ("decode_timeout", "shard_rows"))
def command(out, resume, overwrite, **values):
    """Stage 1: fine-tune the CLIP extractor contrastively and dump features to a cache.

    Several GPUs or machines: start it with torchrun, e.g. `torchrun --nproc_per_node 4 -m
    diffret.pipeline.cli extract ...`; --batch-size stays the global batch.
    """
    from diffret.extract.distributed import env_info, shutdown

    main_rank = env_info().is_main  # under torchrun only rank 0 shows progress and messages
    with clear_errors():
        if not Path(values["data_root"]).exists():
            raise FileNotFoundError(f"data root {values['data_root']} does not exist")
        from diffret.extract.stage1 import run_stage1
        from diffret.pipeline.recipes import stage1_hooks

        cfg = config(ExtractConfig, values)
        if cfg.dataset == "folder" and cfg.epochs > 0 and not cfg.stage1:  # no captions: nothing to fine-tune on
            raise click.UsageError("--dataset folder has videos but no captions, so stage 1 cannot be fine-tuned on "
                                   "it: pass --stage1 PATH (a trained cache's stage1.pt) or --epochs 0 with --pretrained")
        log = console.print if main_rank else (lambda *a, **k: None)
        try:
            with (progress_bar() if main_rank else nullcontext()) as p:
                summary = run_stage1(cfg, out, overwrite=overwrite, progress=p, log=log, resume_training=resume,
                                     hooks=stage1_hooks())
        finally:
            shutdown()  # leave torchrun's process group (a no-op on one process)
    if not main_rank or summary.get("complete"):  # already complete: run_stage1 said so, nothing was done
        return
    counts = ", ".join(f"{s}: {c['captions']} captions / {c['videos']} videos" for s, c in summary["splits"].items())
    grown = f"{summary['grown']} new videos added to {out}" if "grown" in summary else f"cache written to {out}"
    console.print(f"{grown} ({counts}) in {summary['seconds']} s on {summary['device']}")
    if summary["failed"]:
        console.print(f"[yellow]{summary['failed']} videos could not be read and are not in the cache; "
                      f"the list with reasons: {summary['failures_file']}[/]", soft_wrap=True)  # a path to copy
    else:
        console.print("every video was read")
