"""`diffret cache info` and `diffret cache verify`: what a cache holds, and whether it is whole.
Neither loads open_clip, decord or torch."""
from __future__ import annotations

import json
from pathlib import Path

import click
from rich.table import Table

from .errors import clear_errors
from .output import console, out_console, progress_bar


@click.group("cache")
def command():
    """Inspect and check a feature cache (no open_clip, no decord)."""


@command.command("info")
@click.argument("cache_dir", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON instead of tables.")
def info_command(cache_dir, as_json):
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
                 ("dtype", info["dtype"]),
                 ("extraction", ", ".join(f"{k}={v}" for k, v in info["extract_config"].items())),
                 ("unreadable videos", "unknown" if info["failures"] is None else info["failures"]),
                 ("size on disk", f"{human_bytes(info['bytes'])} in all; features "
                                  f"{human_bytes(sum(x['bytes'] for x in info['splits'].values()))} in "
                                  f"{info['shards']} shards")):
        about.add_row(k, str(v))
    splits = Table(title="splits")
    for col in ("split", "captions", "videos", "text shards", "video shards", "shard bytes"):
        splits.add_column(col, justify="left" if col == "split" else "right", no_wrap=True)
    for name, s in info["splits"].items():
        splits.add_row(name, str(s["captions"]), str(s["videos"]), str(s["text_shards"]), str(s["video_shards"]),
                       human_bytes(s["bytes"]))
    out_console.print(about)
    out_console.print(splits)


@command.command("verify")
@click.argument("cache_dir", type=click.Path(path_type=Path))
def verify_command(cache_dir):
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
