"""The `diffret` command: demo data, stage-1 extraction, stage-2 training, evaluation.

Each subcommand imports only what it needs, so `train-generator` and `evaluate` never load
open_clip or decord. Known failures print one line (`error: ...`) and exit with status 1.
"""
from __future__ import annotations

import json
import sys
from contextlib import contextmanager, nullcontext
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
        from diffret.extract.checkpoint import CheckpointError
        from diffret.extract.dump import OutputError
        from diffret.extract.stage1 import ExtractError

        errors += [BackboneError, CheckpointError, ExtractError, OutputError]
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
@click.option("--dataset", default="msrvtt", show_default=True,
              help="Annotation format of --data-root: msrvtt, msvd, lsmdc, activitynet, didemo, or manifest "
                   "(a CSV / JSONL file of video,caption,split for your own videos).")
@click.option("--data-root", required=True, type=click.Path(path_type=Path),
              help="Dataset folder (for --dataset manifest: the manifest file, or its folder).")
@click.option("--video-dir", default=None, show_default="where --dataset looks by default",
              help="Folder of the videos, relative to --data-root or absolute.")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Cache folder to write.")
@click.option("--model", default="ViT-B-32", show_default=True, help="open_clip model name (or `tiny`).")
@click.option("--pretrained", default="openai", show_default=True, help="open_clip tag, local checkpoint path, or none.")
@click.option("--stage1", "stage1_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              show_default="fine-tune a new one",
              help="Dump with this existing stage-1 checkpoint (a cache's stage1.pt), without fine-tuning; "
                   "--model and --pretrained are taken from it.")
@click.option("--epochs", default=5, show_default=True, help="Fine-tuning epochs (0: zero-shot dump).")
@click.option("--batch-size", default=128, show_default=True, help="Global batch (split over the processes under torchrun).")
@click.option("--lr", default=1e-4, show_default=True, help="Learning rate of the new modules.")
@click.option("--clip-lr-scale", default=1e-3, show_default=True, help="CLIP's lr = lr x this.")
@click.option("--weight-decay", default=0.2, show_default=True)
@click.option("--warmup", default=0.1, show_default=True, help="Fraction of the steps with linear warm-up (then cosine).")
@click.option("--grad-clip", default=1.0, show_default=True, help="Gradient-norm clipping.")
@click.option("--loss", type=click.Choice(["infonce", "dsl"]), default="infonce", show_default=True,
              help="Training loss: symmetric InfoNCE, or the dual softmax loss (temperature 1000).")
@click.option("--wti-padding", type=click.Choice(["zero", "exclude"]), default="zero", show_default=True,
              help="A padded pair in the WTI maxima: counts as 0 (the original) or never wins.")
@click.option("--frames", type=int, default=None, show_default="12; 64 for activitynet and didemo",
              help="Frame slots per video.")
@click.option("--words", type=int, default=None, show_default="32; 64 for activitynet and didemo",
              help="Word slots per caption ([SOS] + tokens + [EOT]).")
@click.option("--fps", default="1", show_default=True, help="Sampling rate before subsampling; 'uniform' spreads --frames over the video.")
@click.option("--frame-rule", type=click.Choice(["original", "exact"]), default="original", show_default=True,
              help="Which frames: the original's (integer frame rate, 29.97 -> 29; floor(linspace) subsampling) "
                   "or exact (the float rate, rounded).")
@click.option("--frame-padding", type=click.Choice(["zero-frame", "zero-feature"]), default="zero-frame",
              metavar="KIND", show_default=True,
              help="Padded frame slots: the CLS feature of an all-zero normalised frame (zero-frame, the "
                   "original) or zeros (zero-feature).")
@click.option("--end-second", default=None, metavar="N|none", show_default="31 for didemo, else none",
              help="Sample seconds 0..N of each video only (the original reads DiDeMo to second 31); 'none': all.")
@click.option("--workers", default=2, show_default=True, help="Decoding processes (per process under torchrun).")
@click.option("--amp/--no-amp", default=True, show_default=True, help="Mixed precision (GPU only).")
@click.option("--grad-checkpointing", is_flag=True, show_default="off",
              help="Recompute activations in backward: much less GPU memory, about a third slower.")
@click.option("--resume", is_flag=True, show_default="off",
              help="Continue an unfinished fine-tuning in --out from its last finished epoch.")
@click.option("--device", default="auto", show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--overwrite", is_flag=True, show_default="off",
              help="Start over: replace a cache or an unfinished run in --out (by default an unfinished run resumes).")
@click.option("--decode-timeout", default=60.0, show_default=True,
              help="Seconds one video may take to decode before it is recorded as a failure.")
@click.option("--shard-rows", default=4096, show_default=True, hidden=True, help="Rows per HDF5 shard.")
def extract(dataset, data_root, video_dir, out, model, pretrained, stage1_path, epochs, batch_size, lr, clip_lr_scale,
            weight_decay, warmup, grad_clip, loss, frames, words, fps, workers, amp, grad_checkpointing, resume, device,
            seed, overwrite, decode_timeout, shard_rows, frame_rule, frame_padding, end_second, wti_padding):
    """Stage 1: fine-tune the CLIP extractor contrastively and dump features to a cache.

    Several GPUs or machines: start it with torchrun, e.g. `torchrun --nproc_per_node 4 -m
    diffret.pipeline.cli extract ...`; --batch-size stays the global batch.
    """
    from diffret.extract.distributed import env_info

    main_rank = env_info().is_main  # under torchrun only rank 0 shows progress and messages
    with clear_errors():
        if not Path(data_root).exists():
            raise FileNotFoundError(f"data root {data_root} does not exist")
        from diffret.extract.config import ExtractConfig, default_end_second, default_slots
        from diffret.extract.stage1 import run_stage1

        target_fps = None if fps == "uniform" else float(fps)
        if end_second is None:
            end_second = default_end_second(dataset)
        elif end_second.isdigit() or end_second.lower() == "none":
            end_second = int(end_second) if end_second.isdigit() else None
        else:
            raise click.BadParameter(f"{end_second!r} is not a whole number or 'none'", param_hint="--end-second")
        slot_frames, slot_words = default_slots(dataset)
        cfg = ExtractConfig(
            dataset=dataset, data_root=str(Path(data_root).resolve()), video_dir=video_dir, model=model,
            pretrained=pretrained, epochs=epochs, batch_size=batch_size, lr=lr, clip_lr_scale=clip_lr_scale,
            weight_decay=weight_decay, warmup=warmup, grad_clip=grad_clip, loss=loss,
            frames=slot_frames if frames is None else frames, words=slot_words if words is None else words,
            target_fps=target_fps, frame_rule=frame_rule, frame_padding=frame_padding, end_second=end_second,
            workers=workers, device=device, seed=seed, amp=amp,
            grad_checkpointing=grad_checkpointing, shard_rows=shard_rows, decode_timeout=decode_timeout,
            stage1=str(stage1_path) if stage1_path else None, wti_padding=wti_padding,
        )
        from diffret.extract.distributed import shutdown

        log = console.print if main_rank else (lambda *a, **k: None)
        try:
            with (progress_bar() if main_rank else nullcontext()) as p:
                summary = run_stage1(cfg, out, overwrite=overwrite, progress=p, log=log, resume_training=resume)
        finally:
            shutdown()  # leave torchrun's process group (a no-op on one process)
    if not main_rank:
        return
    counts = ", ".join(f"{s}: {c['captions']} captions / {c['videos']} videos" for s, c in summary["splits"].items())
    console.print(f"cache written to {out} ({counts}) in {summary['seconds']} s on {summary['device']}")
    if summary["failed"]:
        console.print(f"[yellow]{summary['failed']} videos could not be read and are not in the cache; "
                      f"the list with reasons: {summary['failures_file']}[/]", soft_wrap=True)  # a path to copy
    else:
        console.print("every video was read")


@main.command("train-generator")
@click.option("--cache", "cache_dir", required=True, type=click.Path(path_type=Path), help="Cache folder.")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Generator run folder to write.")
@click.option("--epochs", default=5, show_default=True)
@click.option("--steps", default=50, show_default=True, help="Diffusion steps T.")
@click.option("--schedule", type=click.Choice(["cosine", "linear"]), default="cosine", show_default=True)
@click.option("--beta-scale", default=1.0, show_default=True, help="Multiplies every beta (signal-to-noise ablation).")
@click.option("--loss", type=click.Choice(["ce", "mse", "kl"]), default="ce", show_default=True,
              help="Generation loss on x0_hat: cross-entropy of 100 x0_hat, MSE to x0, or KL to a smoothed target.")
@click.option("--x0", type=click.Choice(["onehot", "pm1"]), default="onehot", show_default=True,
              help="x0 target: 1 on the positive and 0 elsewhere, or +1 / -1.")
@click.option("--candidates", default=128, show_default=True, help="Candidates K per query in training.")
@click.option("--negatives", type=click.Choice(["batch", "cache"]), default="batch", show_default=True,
              help="Hard negatives from the batch (the original) or mined from the whole training cache.")
@click.option("--batch-size", default=128, show_default=True)
@click.option("--lr", default=1e-4, show_default=True)
@click.option("--ema", default=0.99, show_default=True, help="EMA decay of the saved weights (0: no EMA).")
@click.option("--recipe", type=click.Choice(["original", "modern"]), default="original", show_default=True,
              help="original: BertAdam (betas 0.9/0.98, no bias correction), 10% warm-up then cosine, weight decay "
                   "0.2, layers N(0, 0.02); modern: AdamW at a constant lr, no decay, PyTorch's default init.")
@click.option("--device", default="auto", show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last finished epoch.")
@click.pass_context
def train_generator_cmd(ctx, cache_dir, out, epochs, steps, schedule, beta_scale, loss, x0, candidates, negatives,
                        batch_size, lr, ema, recipe, device, seed, resume):
    """Stage 2: train the t2v and v2t denoisers on cached features only."""
    from diffret.generator.config import GeneratorConfig
    from diffret.generator.trainer import resume_config, train_generator

    given = dict(steps=steps, schedule=schedule, beta_scale=beta_scale, loss=loss, x0=x0, candidates=candidates,
                 negatives=negatives, batch_size=batch_size, epochs=epochs, lr=lr, ema=ema, recipe=recipe, device=device,
                 seed=seed)
    with clear_errors():
        if resume:  # the saved settings, plus the options given on this command line
            explicit = {k: v for k, v in given.items()
                        if ctx.get_parameter_source(k) == click.core.ParameterSource.COMMANDLINE}
            cfg = resume_config(out, explicit)
        else:
            cfg = GeneratorConfig(**given)
        with progress_bar() as p:
            meta = train_generator(cache_dir, out, cfg, progress=p, log=console.print, resume=resume)
    console.print(f"generator written to {out}: width {meta['width']}, parameters {meta['parameters']}, "
                  f"loss per epoch {meta['history']}, {meta['seconds']} s")


@main.command()
@click.option("--cache", "cache_dir", required=True, type=click.Path(path_type=Path), help="Cache folder.")
@click.option("--generator", "generator_dir", type=click.Path(path_type=Path),
              help="Generator run folder (without one: the stage-1 row and the revisers only).")
@click.option("--steps", "--sample-steps", "steps", type=int, default=None, show_default="the generator's T",
              help="Sampling steps S (strided, <= the generator's T).")
@click.option("--sampler", type=click.Choice(["ddim", "ddpm"]), default="ddim", show_default=True)
@click.option("--clamp/--no-clamp", default=True, show_default=True, help="Clamp x0 to [-1, 1] at every step.")
@click.option("--ddim-eps", type=click.Choice(["clamped", "raw"]), default="clamped", show_default=True,
              help="DDIM re-derives epsilon from the clamped x0 (the original's guided-diffusion) or the raw one "
                   "(diffusers' default).")
@click.option("--top-k", default="32", show_default=True, help="Candidates re-ranked per query, or 'all'.")
@click.option("--alpha", default=1.0, show_default=True, help="Weight of the generated distribution.")
@click.option("--temp", default=1.0, show_default=True, help="Softmax temperature on x0.")
@click.option("--dsl", is_flag=True, help="Add the row `dsl`: Dual Softmax on the stage-1 scores.")
@click.option("--dsl-temp", default=1.0, show_default=True, help="Dual Softmax temperature (on logit-scaled scores).")
@click.option("--qb-norm", is_flag=True, help="Add the row `qbnorm`: QB-Norm on the stage-1 scores, bank = train split.")
@click.option("--qb-beta", default=20.0, show_default=True, help="QB-Norm inverse temperature.")
@click.option("--qb-k", default=1, show_default=True, help="QB-Norm activation set: top-k of each bank query.")
@click.option("--split", default="test", show_default=True)
@click.option("--allow-other-cache", is_flag=True,
              help="Evaluate on a cache of another stage-1 model (the width must still match).")
@click.option("--save-sims", type=click.Path(path_type=Path), help="Save every row's score matrices here (.npz).")
@click.option("--memory-budget", type=float, default=2.0, show_default=True,
              help="GiB of score matrices held at once; a larger test set is evaluated in streamed blocks.")
@click.option("--device", default="auto", show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--json", "json_out", type=click.Path(path_type=Path), help="Write the metrics here.")
def evaluate_cmd(cache_dir, generator_dir, steps, sampler, clamp, ddim_eps, top_k, alpha, temp, dsl, dsl_temp, qb_norm,
                 qb_beta, qb_k, split, allow_other_cache, save_sims, memory_budget, device, seed, json_out):
    """Retrieval metrics in both directions: stage-1 scores, their diffusion re-ranking, DSL, QB-Norm."""
    from .evaluate import EvalOptions, evaluate

    with clear_errors():
        if top_k.lower() == "all":
            k = None
        elif top_k.isdigit() and int(top_k) > 0:
            k = int(top_k)
        else:
            raise ValueError(f"--top-k must be a positive number or 'all', got {top_k!r}")
        opts = EvalOptions(steps=steps, sampler=sampler, clamp=clamp, ddim_eps=ddim_eps, top_k=k, alpha=alpha, temp=temp,
                           dsl=dsl, dsl_temp=dsl_temp, qb_norm=qb_norm, qb_beta=qb_beta, qb_k=qb_k, split=split,
                           device=device, seed=seed, allow_other_cache=allow_other_cache,
                           memory_budget=int(memory_budget * 2**30))
        if not memory_budget > 0:
            raise ValueError(f"--memory-budget must be a positive number of GiB, got {memory_budget}")
        with progress_bar() as p:
            report = evaluate(cache_dir, generator_dir, opts, progress=p, save_sims_to=save_sims)
    title = f"{report['n_queries']} queries x {report['n_candidates']} videos"
    if "steps" in report:
        title += f", top-{report['top_k']}, {report['steps']} {report['sampler'].upper()} steps"
    out_console.print(results_table(f"{title} ({report['seconds']} s)", report["results"]))
    if save_sims:
        console.print(f"score matrices written to {save_sims}")
    if json_out:
        Path(json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(json_out).write_text(json.dumps(report, indent=2) + "\n")
        console.print(f"metrics written to {json_out}")


def _int_list(value: str) -> list[int]:
    try:
        return [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {value!r}") from None


@main.command()
@click.option("--cache", "cache_dir", required=True, type=click.Path(path_type=Path), help="Cache folder.")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Sweep folder (generators, CSV, JSON, PNG).")
@click.option("--steps", "steps_list", default="10,50,100,1000", show_default=True, help="Diffusion steps T to try.")
@click.option("--schedules", default="cosine,linear", show_default=True)
@click.option("--losses", default="ce", show_default=True, help="Any of ce,mse,kl.")
@click.option("--samplers", default="ddim", show_default=True, help="Any of ddim,ddpm.")
@click.option("--seeds", default="0", show_default=True)
@click.option("--epochs", default=5, show_default=True)
@click.option("--candidates", default=128, show_default=True)
@click.option("--batch-size", default=128, show_default=True)
@click.option("--lr", default=1e-4, show_default=True)
@click.option("--top-k", default=32, show_default=True, help="Candidates re-ranked per query at evaluation.")
@click.option("--device", default="auto", show_default=True)
def sweep(cache_dir, out, steps_list, schedules, losses, samplers, seeds, epochs, candidates, batch_size, lr, top_k,
          device):
    """Grid of stage-2 runs on one cache: a CSV/JSON table, a printed table and a plot of R@1 against T."""
    from diffret.generator.config import GeneratorConfig

    from .evaluate import EvalOptions
    from .sweep import SweepGrid, run_sweep

    words = lambda v: [x.strip() for x in v.split(",") if x.strip()]  # noqa: E731
    grid = SweepGrid(steps=_int_list(steps_list), schedules=words(schedules), losses=words(losses),
                     samplers=words(samplers), seeds=_int_list(seeds))
    base = GeneratorConfig(epochs=epochs, candidates=candidates, batch_size=batch_size, lr=lr, device=device)
    with clear_errors(), progress_bar() as p:
        report = run_sweep(cache_dir, out, grid, base, EvalOptions(top_k=top_k, device=device), progress=p,
                           log=console.print)
    table = Table(title=f"sweep on {cache_dir}: R@1 / Rsum, top-{top_k}, all T sampling steps ({report['seconds']} s)")
    for col in ("schedule", "T", "loss", "sampler", "seed", "t2v R@1", "v2t R@1", "Rsum"):
        table.add_column(col, justify="right" if col in ("T", "seed", "t2v R@1", "v2t R@1", "Rsum") else "left")
    d = report["discriminative"]
    table.add_row("discriminative", "", "", "", "", f"{d['t2v_R@1']:.1f}", f"{d['v2t_R@1']:.1f}", f"{d['Rsum']:.1f}")
    for r in report["rows"]:
        table.add_row(r["schedule"], str(r["steps"]), r["loss"], r["sampler"], str(r["seed"]), f"{r['t2v_R@1']:.1f}",
                      f"{r['v2t_R@1']:.1f}", f"{r['Rsum']:.1f}")
    out_console.print(table)
    console.print(f"wrote {report['files']['csv']}, {report['files']['json']} and {report['files']['png']}")


@main.command("import-checkpoint")
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Folder for stage1.pt and generator/.")
@click.option("--model", default="auto", show_default=True,
              help="open_clip name of the CLIP inside; auto: ViT-B-32/ViT-B-16/ViT-L-14 (QuickGELU) from the shapes.")
@click.option("--frames", default=12, show_default=True, help="Frame slots (64 for ActivityNet).")
@click.option("--words", default=32, show_default=True, help="Word slots (64 for ActivityNet).")
@click.option("--dataset", default="msrvtt", show_default=True, help="Annotation format recorded in stage1.pt.")
@click.option("--steps", default=50, show_default=True, help="Diffusion steps T the denoisers were trained with.")
@click.option("--schedule", type=click.Choice(["cosine", "linear"]), default="cosine", show_default=True)
def import_checkpoint_cmd(checkpoint, out, model, frames, words, dataset, steps, schedule):
    """Map a released DiffusionRet checkpoint (.pth) into our stage-1 checkpoint and generator."""
    from .import_checkpoint import import_checkpoint

    with clear_errors():
        summary = import_checkpoint(checkpoint, out, model=model, frames=frames, words=words, dataset=dataset,
                                    steps=steps, schedule=schedule, log=console.print)
    if summary["stage1"]:
        console.print(f"stage 1 ({summary['model']}, fingerprint {summary['fingerprint']}) -> {summary['stage1']}")
    if summary["generator"]:
        console.print(f"denoisers (width {summary['width']}, parameters {summary['parameters']}) -> {summary['generator']}")
    if summary["ignored"]:
        console.print(f"[yellow]ignored {len(summary['ignored'])} keys: {', '.join(summary['ignored'][:5])}"
                      f"{' ...' if len(summary['ignored']) > 5 else ''}[/]")


@main.group("cache")
def cache_group():
    """Inspect and check a feature cache (no open_clip, no decord)."""


@cache_group.command("info")
@click.argument("cache_dir", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON instead of tables.")
def cache_info_cmd(cache_dir, as_json):
    """What a cache holds: splits, counts, widths, model, sizes on disk."""
    from diffret.cache.info import cache_info, human_bytes

    with clear_errors():
        info = cache_info(cache_dir)
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    model = info["model"]
    about = Table(title=f"cache {cache_dir}", show_header=False)
    about.add_column("field", no_wrap=True)
    about.add_column("value")
    for k, v in (("dataset", info["dataset"]), ("model", f"{model.get('name', '')} ({model.get('pretrained', '')})"),
                 ("stage-1 fingerprint", model.get("fingerprint", "")), ("activation", info["activation"] or "unknown"),
                 ("schema version", info["schema_version"]),
                 ("width D", info["width"]), ("word slots L", info["n_words"]), ("frame slots F", info["n_frames"]),
                 ("dtype", info["dtype"]), ("extraction", ", ".join(f"{k}={v}" for k, v in info["extract_config"].items())),
                 ("unreadable videos", "unknown" if info["failures"] is None else info["failures"]),
                 ("size on disk", f"{human_bytes(info['bytes'])} in all; features "
                                  f"{human_bytes(sum(x['bytes'] for x in info['splits'].values()))} in {info['shards']} shards")):
        about.add_row(k, str(v))
    splits = Table(title="splits")
    for col in ("split", "captions", "videos", "text shards", "video shards", "shard bytes"):
        splits.add_column(col, justify="left" if col == "split" else "right", no_wrap=True)
    for name, s in info["splits"].items():
        splits.add_row(name, str(s["captions"]), str(s["videos"]), str(s["text_shards"]), str(s["video_shards"]),
                       human_bytes(s["bytes"]))
    out_console.print(about)
    out_console.print(splits)


@cache_group.command("verify")
@click.argument("cache_dir", type=click.Path(path_type=Path))
def cache_verify_cmd(cache_dir):
    """Check checksums, shapes, row counts and index <-> tensor consistency; exit 1 naming the first problem."""
    from diffret.cache.info import human_bytes
    from diffret.cache.verify import verify_cache

    with clear_errors(), progress_bar() as p:
        report = verify_cache(cache_dir, progress=p)
    counts = ", ".join(f"{s}: {c['captions']} captions / {c['videos']} videos" for s, c in report["splits"].items())
    for note in report["notes"]:
        console.print(f"[yellow]note: {note}[/]")
    out_console.print(f"OK: {cache_dir} verified ({report['shards']} shards, {human_bytes(report['bytes'])}; {counts}; "
                      f"{report['failures']} unreadable videos listed)")


if __name__ == "__main__":
    main()
