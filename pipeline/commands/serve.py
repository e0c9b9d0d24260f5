"""`diffret serve`: a local web page to search a collection and watch the results
(options: pipeline/serve/config.py ServeOptions; the app: pipeline/serve/app.py)."""
from __future__ import annotations

import sys
from pathlib import Path

import click

from ..serve.config import ServeOptions
from .errors import clear_errors
from .options import config, options
from .output import console


@click.command("serve")
@click.option("--cache", "caches", multiple=True, required=True, type=click.Path(path_type=Path),
              help="Cache folder; repeat for several caches of one stage-1 model (one collection).")
@click.option("--generator", "generator_dir", type=click.Path(path_type=Path),
              help="Generator run folder: re-rank each query's best 32 by diffusion.")
@options(ServeOptions, ("host", "port", "k", "max_k", "thumb_width", "thumb_cache_mb", "device", "split", "candidates",
                        "batch", "threads"))
def command(caches, generator_dir, **values):
    """Serve a web page on this machine: search the collection, see each hit's best moment, play it."""
    with clear_errors():
        opts = config(ServeOptions, values)
        from ..serve.server import bind, serve, url_of

        sock = bind(opts.host, opts.port)  # before the model loads: a busy port fails at once
        try:
            with console.status("loading the model and the caches"):
                import torch

                from ..search import Searcher

                torch.set_num_threads(opts.threads)

                searcher = Searcher([str(c) for c in caches], generator=str(generator_dir) if generator_dir else None,
                                    device=opts.device, split=opts.split)
            from ..serve.app import create_app

            app = create_app(searcher, opts)
            app.state.service.warm_up()  # the first request then costs what every later one does
        except BaseException:
            sock.close()
            raise
    if not opts.is_loopback:
        console.print(f"warning: listening on {opts.host}: anyone who can reach this machine on the network can "
                      "search the collection and watch its videos", style="yellow", markup=False, highlight=False)
    for note in getattr(getattr(searcher, "collection", None), "notes", ()):
        console.print(f"note: {note}", style="yellow", markup=False, highlight=False, soft_wrap=True)
    table = app.state.table
    extra = ", diffusion re-ranking" if searcher.has_generator else ""
    missing = sum(1 for e in table.entries if e.path is None or not e.path.is_file())
    note = f" ({missing} without a readable video file: placeholders)" if missing else ""
    # the URL line is stdout, the first line: scripts (the browser test) read it
    click.echo(f"serving {len(table)} videos from {len(caches)} cache(s){extra}{note} at {url_of(sock)}", err=False)
    console.print("Ctrl-C stops the server", style="dim")
    sys.setswitchinterval(0.001)  # the event loop gets the GIL back within 1 ms of a search's Python work
    serve(app, sock)
