"""The `diffret` command: demo data, stage-1 extraction, stage-2 training, evaluation.

Each subcommand imports only what it needs, so `train-generator` and `evaluate` never load
open_clip or decord. Known failures print one line (`error: ...`) and exit with status 1.
"""
from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from pathlib import Path

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

console = Console(stderr=True)
out_console = Console()


@contextmanager
def progress_bar():
    """A rich progress display that library loops add tasks to."""
    with Progress(
        TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=False,
    ) as p:
        yield p


def _known_errors() -> tuple[type[BaseException], ...]:
    from diffret.cache.manifest import CacheError

    errors: list[type[BaseException]] = [CacheError, FileNotFoundError, ValueError, PermissionError]
    for mod, names in (
        ("diffret.generator.checkpoint", ["GeneratorError"]),
        ("diffret.generator.trainer", ["TrainingError"]),
    ):
        m = __import__(mod, fromlist=names)
        errors += [getattr(m, n) for n in names]
    if "diffret.extract.stage1" in sys.modules:  # only loaded by `extract`
        from diffret.extract.backbone import BackboneError
        from diffret.extract.stage1 import ExtractError

        errors += [BackboneError, ExtractError]
    return tuple(errors)


@contextmanager
def clear_errors():
    """Turn the project's known failures into a one-line message and exit status 1."""
    try:
        yield
    except click.exceptions.Exit:
        raise
    except Exception as e:
        if isinstance(e, _known_errors()):
            raise click.ClickException(str(e).splitlines()[0] if str(e) else type(e).__name__) from None
        raise


def results_table(title: str, results: dict) -> Table:
    """One line per (row, direction): R@1, R@5, R@10 (percent), MdR, MnR; Rsum per row."""
    table = Table(title=title)
    for col in ("row", "dir", "R@1", "R@5", "R@10", "MdR", "MnR", "Rsum"):
        table.add_column(col, justify="left" if col in ("row", "dir") else "right", no_wrap=True)
    for row, r in results.items():
        for d in ("t2v", "v2t"):
            cells = [f"{r[d][m]:.1f}" for m in ("R@1", "R@5", "R@10", "MdR", "MnR")]
            table.add_row(row if d == "t2v" else "", d, *cells, f"{r['Rsum']:.1f}" if d == "t2v" else "")
    return table


@click.group()
@click.version_option(package_name="diffret")
def main():
    """diffret: generative text-video retrieval (DiffusionRet) on a feature cache."""


@main.command("demo-data")
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--train", "n_train", default=1000, show_default=True, help="Training videos.")
@click.option("--test", "n_test", default=200, show_default=True, help="Test videos (one caption each).")
@click.option("--seed", default=0, show_default=True)
@click.option("--shifted", is_flag=True, help="Out-of-domain variant: unseen backgrounds, new phrasings.")
@click.option("--workers", default=2, show_default=True)
def demo_data(out, n_train, n_test, seed, shifted, workers):
    """Write the synthetic demo set (real .mp4 files) in the MSRVTT layout under OUT."""
    from .demo import make_demo_dataset

    with clear_errors(), progress_bar() as p:
        task = p.add_task("render demo videos", total=n_train + n_test)
        summary = make_demo_dataset(
            out, n_train=n_train, n_test=n_test, seed=seed, shifted=shifted, workers=workers,
            progress=lambda done, total: p.update(task, completed=done),
        )
    console.print(f"demo set: {summary['train_videos']} train + {summary['test_videos']} test videos, "
                  f"{summary['captions']} captions in {out}")


@main.command()
@click.option("--dataset", default="msrvtt", show_default=True, help="Annotation format of --data-root.")
@click.option("--data-root", required=True, type=click.Path(path_type=Path), help="Dataset folder.")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Cache folder to write.")
@click.option("--model", default="ViT-B-32", show_default=True, help="open_clip model name (or `tiny`).")
@click.option("--pretrained", default="openai", show_default=True, help="open_clip tag, local checkpoint path, or none.")
@click.option("--epochs", default=5, show_default=True, help="Fine-tuning epochs (0: zero-shot dump).")
@click.option("--batch-size", default=128, show_default=True)
@click.option("--lr", default=1e-4, show_default=True, help="Learning rate of the new modules.")
@click.option("--clip-lr-scale", default=1e-3, show_default=True, help="CLIP's lr = lr x this.")
@click.option("--frames", default=12, show_default=True, help="Frame slots per video.")
@click.option("--words", default=32, show_default=True, help="Word slots per caption ([SOS] + tokens + [EOT]).")
@click.option("--fps", default="1", show_default=True, help="Sampling rate before subsampling; 'uniform' spreads --frames over the video.")
@click.option("--workers", default=2, show_default=True, help="Decoding processes.")
@click.option("--device", default="auto", show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace an existing cache in --out.")
def extract(dataset, data_root, out, model, pretrained, epochs, batch_size, lr, clip_lr_scale, frames, words, fps,
            workers, device, seed, overwrite):
    """Stage 1: fine-tune the CLIP extractor contrastively and dump features to a cache."""
    with clear_errors():
        if not Path(data_root).is_dir():
            raise FileNotFoundError(f"data root {data_root} does not exist")
        from diffret.extract.config import ExtractConfig
        from diffret.extract.stage1 import run_stage1

        target_fps = None if fps == "uniform" else float(fps)
        cfg = ExtractConfig(
            dataset=dataset, data_root=str(data_root), model=model, pretrained=pretrained, epochs=epochs,
            batch_size=batch_size, lr=lr, clip_lr_scale=clip_lr_scale, frames=frames, words=words,
            target_fps=target_fps, workers=workers, device=device, seed=seed,
        )
        with progress_bar() as p:
            summary = run_stage1(cfg, out, overwrite=overwrite, progress=p, log=console.print)
    counts = ", ".join(f"{s}: {c['captions']} captions / {c['videos']} videos" for s, c in summary["splits"].items())
    console.print(f"cache written to {out} ({counts}) in {summary['seconds']} s on {summary['device']}")
    if summary["failed"]:
        console.print(f"[yellow]{summary['failed']} videos could not be read; see {summary['failures_file']}[/]")


@main.command("train-generator")
@click.option("--cache", "cache_dir", required=True, type=click.Path(path_type=Path), help="Cache folder.")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Generator run folder to write.")
@click.option("--epochs", default=5, show_default=True)
@click.option("--steps", default=50, show_default=True, help="Diffusion steps T.")
@click.option("--schedule", type=click.Choice(["cosine", "linear"]), default="cosine", show_default=True)
@click.option("--candidates", default=128, show_default=True, help="Candidates K per query in training.")
@click.option("--batch-size", default=128, show_default=True)
@click.option("--lr", default=1e-4, show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option("--seed", default=0, show_default=True)
def train_generator_cmd(cache_dir, out, epochs, steps, schedule, candidates, batch_size, lr, device, seed):
    """Stage 2: train the t2v and v2t denoisers on cached features only."""
    from diffret.generator.config import GeneratorConfig
    from diffret.generator.trainer import train_generator

    cfg = GeneratorConfig(steps=steps, schedule=schedule, candidates=candidates, batch_size=batch_size,
                          epochs=epochs, lr=lr, device=device, seed=seed)
    with clear_errors(), progress_bar() as p:
        meta = train_generator(cache_dir, out, cfg, progress=p, log=console.print)
    console.print(f"generator written to {out}: width {meta['width']}, parameters {meta['parameters']}, "
                  f"loss per epoch {meta['history']}, {meta['seconds']} s")


@main.command()
@click.option("--cache", "cache_dir", required=True, type=click.Path(path_type=Path), help="Cache folder.")
@click.option("--generator", "generator_dir", required=True, type=click.Path(path_type=Path), help="Generator run folder.")
@click.option("--steps", default=50, show_default=True, help="DDIM sampling steps (<= the generator's T).")
@click.option("--top-k", default=32, show_default=True, help="Candidates re-ranked per query.")
@click.option("--alpha", default=1.0, show_default=True, help="Weight of the generated distribution.")
@click.option("--temp", default=1.0, show_default=True, help="Softmax temperature on x0.")
@click.option("--split", default="test", show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--json", "json_out", type=click.Path(path_type=Path), help="Write the metrics here.")
def evaluate_cmd(cache_dir, generator_dir, steps, top_k, alpha, temp, split, device, seed, json_out):
    """Retrieval metrics in both directions: stage-1 scores and their diffusion re-ranking."""
    from .evaluate import evaluate

    with clear_errors():
        report = evaluate(cache_dir, generator_dir, steps=steps, top_k=top_k, alpha=alpha, temp=temp,
                          split=split, device=device, seed=seed)
    title = (f"{report['n_queries']} queries x {report['n_candidates']} videos, top-{report['top_k']}, "
             f"{report['steps']} steps ({report['seconds']} s)")
    out_console.print(results_table(title, report["results"]))
    if json_out:
        Path(json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(json_out).write_text(json.dumps(report, indent=2) + "\n")
        console.print(f"metrics written to {json_out}")


if __name__ == "__main__":
    main()
