"""`diffret search`: free-text queries over one or several caches (options: pipeline/search.py SearchOptions)."""
from __future__ import annotations

import json
from pathlib import Path

import click

from ..search import SearchOptions
from .errors import clear_errors
from .options import config, options
from .output import console, out_console

ANSWERING = ("k", "candidates", "split", "qb_norm", "qb_beta", "qb_k")
RERANKING = ("sample_steps", "alpha", "temp", "seed")


def read_queries(path: Path) -> list[str]:
    """One query per non-blank line of a UTF-8 file (a BOM allowed); a one-line error otherwise."""
    path = Path(path)
    if not path.is_file():
        raise click.UsageError(f"--queries {path} is not a file")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise click.UsageError(f"--queries {path} line {line}: not UTF-8 text ({e.reason} at byte {e.start}); "
                               f"save the file as UTF-8") from None
    queries = [line.strip() for line in text.splitlines() if line.strip()]
    if not queries:
        raise click.UsageError(f"--queries {path} holds no query (one per line)")
    return queries


def _fit(searcher, query: str) -> str:
    """A query cut to what the model reads, with a note: the characters past `max_query_chars`, and
    the tokens past the word slots (the tokenizer keeps the first L - 2)."""
    if len(query) > searcher.max_query_chars:
        console.print(f"[yellow]note: the query is {len(query):,} characters long; searching with its first "
                      f"{searcher.max_query_chars:,} (the model reads at most {searcher.n_words - 2} tokens)[/]")
        query = query[:searcher.max_query_chars]
    counter = getattr(searcher.encoder, "count_tokens", None)
    n = counter(query) if counter else 0
    if n > searcher.n_words - 2:
        console.print(f"[yellow]note: the query has {n} tokens; the model reads its first {searcher.n_words - 2} "
                      f"(the rest is ignored)[/]", soft_wrap=True)
    return query


def hits_table(title: str, hits: list[dict], generator: bool):
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    cols = ["rank", "video", "path", "score", "stage 1"] + (["diffusion"] if generator else []) + ["best time"]
    for c in cols:
        table.add_column(c, justify="right" if c in ("rank", "score", "best time") else "left",
                         no_wrap=c != "path", overflow="fold")
    for h in hits:
        t = h["evidence"]["best_time"]
        row = [str(h["rank"]), h["video_id"], h["path"] or "", f"{h['score']:.4f}",
               f"#{h['stage1_rank']} {h['stage1_score']:.4f}"]
        if generator:
            row.append(f"#{h['diffusion_rank']} {h['diffusion_score']:.4f}" if h["diffusion_rank"] else "")
        row.append("" if t is None else f"{t:.2f} s")
        table.add_row(*row)
    return table


@click.command("search")
@click.argument("query", required=False)
@click.option("--cache", "caches", multiple=True, required=True, type=click.Path(path_type=Path),
              help="Cache folder; repeat it to search several caches of the same stage-1 model as one collection.")
@click.option("--queries", "queries_file", type=click.Path(path_type=Path),
              help="A UTF-8 file of queries, one per line (answered in batches), instead of QUERY.")
@click.option("--generator", "generator_dir", type=click.Path(path_type=Path),
              help="Generator run folder: re-rank the best 32 with the diffusion sampler, as evaluate does.")
@options(SearchOptions, ANSWERING)
@options(SearchOptions, RERANKING)
@click.option("--json", "json_out", help="Write the hits as JSON to this file, or '-' for standard output.")
@options(SearchOptions, ("device", "batch_size"))
def command(query, caches, queries_file, generator_dir, json_out, **values):
    """Search the videos of the cache(s) for QUERY, e.g. diffret search --cache CACHE "a dog runs on the beach"."""
    with clear_errors():
        if (query is None) == (queries_file is None):
            raise click.UsageError("give one QUERY or --queries FILE (not both, not neither)")
        queries = read_queries(queries_file) if queries_file else [query]
        opts = config(SearchOptions, values)  # the numbers' ranges: one line (SearchOptions.__post_init__)
        if json_out and json_out != "-":
            from diffret.cache.paths import check_output_path

            check_output_path(Path(json_out), "--json", folder=False)
        from ..search import Searcher, SearchError

        if any(not q.strip() for q in queries):
            raise SearchError("the query is empty: give a sentence to search for")
        searcher = Searcher(list(caches), generator=generator_dir, device=opts.device, split=opts.split,
                            options=opts)
        for note in searcher.collection.notes:
            console.print(f"[yellow]note: {note}[/]", soft_wrap=True)
        queries = [_fit(searcher, q) for q in queries]
        results = searcher.search_many(queries, k=opts.k, candidates=opts.candidates, qb_norm=opts.qb_norm)
    if json_out != "-":
        n = len(searcher.videos)
        for q, hits in zip(queries, results):
            title = f"{q[:120]!r}: top {len(hits)} of {n} videos"
            out_console.print(hits_table(title, hits, searcher.has_generator))
    if json_out:
        data = results[0] if queries_file is None else [{"query": q, "hits": h} for q, h in zip(queries, results)]
        text = json.dumps(data, indent=2, allow_nan=False, ensure_ascii=False) + "\n"
        if json_out == "-":
            click.echo(text, nl=False)
        else:
            from diffret.cache.atomic import atomic_write_text

            with clear_errors():
                Path(json_out).parent.mkdir(parents=True, exist_ok=True)
                atomic_write_text(Path(json_out), text)
            console.print(f"hits written to {json_out}")
