"""`diffret demo-data`: the synthetic demo set (options: pipeline/demo.py DemoConfig)."""
from __future__ import annotations

from pathlib import Path

import click

from ..demo import DemoConfig, make_demo_dataset
from .errors import clear_errors
from .options import options
from .output import console, progress_bar


@click.command("demo-data")
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@options(DemoConfig, ("n_train", "n_test", "seed", "shifted", "workers"))
def command(out, **values):
    """Write the synthetic demo set (real .mp4 files) in the MSRVTT layout under OUT."""
    with clear_errors():
        DemoConfig(**values)  # the numbers are refused before the progress bar starts
    with clear_errors(), progress_bar() as p:
        task = p.add_task("render demo videos", total=values["n_train"] + values["n_test"])
        summary = make_demo_dataset(out, progress=lambda done, total: p.update(task, completed=done), **values)
    console.print(f"demo set: {summary['train_videos']} train + {summary['test_videos']} test videos, "
                  f"{summary['captions']} captions in {out}")
