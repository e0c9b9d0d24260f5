"""`diffret index`: build a cache's first-stage search index (options: cache/index.py IndexOptions)."""
from __future__ import annotations

import click

from diffret.cache.index import IndexOptions

from .errors import clear_errors
from .options import cache_option, config, options
from .output import console, progress_bar


@click.command("index")
@cache_option
@options(IndexOptions, ("kind", "nlist", "nprobe", "ef_search"))
def command(cache_dir, **values):
    """Build the approximate nearest-neighbour index that `diffret search` takes its candidates from.

    Written into the cache folder (index/, atomically) and recorded in its manifest; rebuilt by
    running the command again (after an extraction changed the cache, search refuses the old one).
    """
    import time

    from diffret.cache.index import build_index
    from diffret.cache.lock import OutputLock
    from diffret.cache.manifest import read_manifest

    with clear_errors():
        opts = config(IndexOptions, values)
        params = opts.params()
        read_manifest(cache_dir)  # a clear line for a folder that is not a cache, before locking it
        t0 = time.time()
        with OutputLock(cache_dir, log=console.print), progress_bar() as p:
            entry = build_index(cache_dir, opts.kind, params, progress=p)
    n = sum(entry["rows"].values())
    shown = ", ".join(f"{k}={v}" for k, v in entry["params"].items())
    console.print(f"{entry['kind']} index of {n} videos ({entry['representation']} tokens"
                  f"{'; ' + shown if shown else ''}) written to {cache_dir}/index in {time.time() - t0:.1f} s")
