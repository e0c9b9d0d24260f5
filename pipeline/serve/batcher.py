"""Searches that arrive together are answered together: one `Searcher.search_many` call per batch.

Under load most of a search is per-call work (encoding the text, the Python around the scorers),
which a batch shares: on the demo collection a batch of 32 costs about half as much per query as
32 single searches. Nothing waits to fill a batch: a request that finds the searcher idle runs at
once, alone; the requests that arrive while a batch runs form the next one. One batch runs at a
time (in a worker thread: torch already uses every core for one). A batch asks for the largest k
of its requests and each request takes its prefix (the hits are in final order, so the top k of a
longer list is the top k). If the batch fails with the Searcher's own error (a bad query), each of
its queries is searched alone, so that error reaches only its request.
"""
from __future__ import annotations

import asyncio
import threading
from typing import Callable

import anyio

MAX_BATCH = 32


class SearchBatcher:
    """`await batcher.search(query, k)` -> the hits of one query, searched in batches."""

    def __init__(self, searcher, bad_query: type[Exception], max_batch: int = MAX_BATCH, candidates: int | None = None):
        self.searcher, self.bad_query, self.max_batch = searcher, bad_query, max_batch
        self.candidates = candidates  # the Searcher's first-stage candidates (None: its default)
        self._pending: list[tuple[str, int, asyncio.Future]] = []
        self._worker: asyncio.Task | None = None
        self.lock = threading.Lock()  # the Searcher is used by one thread at a time
        self.batches = self.queries = 0  # counters (tests, the load benchmark)

    async def search(self, query: str, k: int, finish: Callable | None = None):
        """The hits of `query`, or `finish(hits)` computed in the worker thread (so that turning the
        hits into a response, JSON included, does not hold up the event loop)."""
        future = asyncio.get_running_loop().create_future()
        self._pending.append((query, k, finish, future))
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        while self._pending:
            batch, self._pending = self._pending[:self.max_batch], self._pending[self.max_batch:]
            batch = [b for b in batch if not b[3].done()]  # a cancelled request
            if not batch:
                continue
            try:
                results = await anyio.to_thread.run_sync(self._run, batch)
            except Exception as e:  # noqa: BLE001  an internal error: every request of the batch gets it
                results = [e] * len(batch)
            for (_, _, _, future), result in zip(batch, results):
                if future.done():
                    continue
                if isinstance(result, BaseException):
                    future.set_exception(result)
                else:
                    future.set_result(result)

    def _run(self, batch: list) -> list:
        """Per request of `batch`: its result, or its exception (blocking)."""
        queries, k = [q for q, _, _, _ in batch], max(k for _, k, _, _ in batch)
        with self.lock:
            self.batches += 1
            self.queries += len(queries)
            try:
                hits = self.searcher.search_many(queries, k=k, candidates=self.candidates)
            except self.bad_query:
                if len(queries) == 1:
                    raise
                hits = [_or_error(lambda q=q: self.searcher.search(q, k=k, candidates=self.candidates), self.bad_query)
                        for q in queries]
        return [h if isinstance(h, BaseException) else _or_error(lambda h=h, k=k_, f=f: f(h[:k]) if f else h[:k])
                for h, (_, k_, f, _) in zip(hits, batch)]


def _or_error(fn: Callable, error: type[Exception] = Exception):
    try:
        return fn()
    except error as e:
        return e
