"""`diffret import-checkpoint`: a released DiffusionRet checkpoint as ours (options: pipeline/
import_checkpoint.py ImportOptions, and GeneratorConfig's for how its denoisers were trained)."""
from __future__ import annotations

from pathlib import Path

import click

from diffret.generator.config import GeneratorConfig

from ..import_checkpoint import ImportOptions, import_checkpoint
from .errors import clear_errors
from .options import config, options
from .output import console


@click.command("import-checkpoint")
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Folder for stage1.pt and generator/.")
@options(ImportOptions, ("model", "frames", "words", "dataset"))
@options(GeneratorConfig, ("train_steps", "schedule"),
         overrides={"train_steps": {"help": "Diffusion steps T the denoisers were trained with."}})
def command(checkpoint, out, **values):
    """Map a released DiffusionRet checkpoint (.pth) into our stage-1 checkpoint and generator."""
    with clear_errors():
        summary = import_checkpoint(checkpoint, out, config(ImportOptions, values), config(GeneratorConfig, values))
    if summary["stage1"]:
        console.print(f"stage 1 ({summary['model']}, fingerprint {summary['fingerprint']}) -> {summary['stage1']}")
    if summary["generator"]:
        console.print(f"denoisers (width {summary['width']}, parameters {summary['parameters']}) -> "
                      f"{summary['generator']}")
    if summary["ignored"]:
        console.print(f"[yellow]ignored {len(summary['ignored'])} keys: {', '.join(summary['ignored'][:5])}"
                      f"{' ...' if len(summary['ignored']) > 5 else ''}[/]")
