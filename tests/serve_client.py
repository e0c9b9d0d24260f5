"""Test helpers for `diffret serve`: raw HTTP (the path is sent exactly as given, no client-side
normalisation, so traversal attempts reach the server as written) and a stand-in Searcher with the
contract's attributes, for the unit tests of the app."""
from __future__ import annotations

import http.client
import json
import time
from urllib.parse import urlsplit


class Reply:
    def __init__(self, status: int, headers: dict, body: bytes):
        self.status, self.headers, self.body = status, headers, body

    def json(self):
        return json.loads(self.body)

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")


def get(base: str, path: str, headers: dict | None = None, method: str = "GET") -> Reply:
    """One request of `path` (sent verbatim) to the server at `base`."""
    u = urlsplit(base)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    try:
        conn.putrequest(method, path, skip_accept_encoding=True)
        for k, v in (headers or {}).items():
            conn.putheader(k, v)
        conn.endheaders()
        r = conn.getresponse()
        return Reply(r.status, {k.lower(): v for k, v in r.getheaders()}, r.read())
    finally:
        conn.close()


class FakeSearcher:
    """The Searcher contract over a list of videos: hits in a fixed order that depends on the query
    (each video's score is the number of query words in its video id), evidence included. Query
    "boom" raises an internal error (not a SearchError), to check no trace reaches a client; "bad"
    a SearchError."""

    def __init__(self, videos: list[dict], has_generator: bool = False, max_query_chars: int = 200):
        from diffret.pipeline.serve.app import search_error

        self.videos, self.has_generator, self.max_query_chars = videos, has_generator, max_query_chars
        self.error = search_error()
        self.calls = 0
        self.delay = 0.0  # seconds each search_many takes (to make requests arrive during a batch)
        self.batch_sizes: list[int] = []

    def search(self, query: str, k: int = 10, candidates=None, qb_norm: bool = False) -> list[dict]:
        self.calls += 1
        if not query.strip():
            raise self.error("the query is empty")
        if not 1 <= k <= len(self.videos):
            raise self.error(f"k must be from 1 to {len(self.videos)}")
        if query == "bad":
            raise self.error("a bad query")
        if query == "boom":
            raise RuntimeError("secret internal detail /etc/shadow")
        words = query.lower().split()
        s1 = [sum(w in v["video_id"].lower() for w in words) - 0.01 * i for i, v in enumerate(self.videos)]
        order1 = sorted(range(len(s1)), key=lambda i: -s1[i])
        rank1 = {i: r for r, i in enumerate(order1, 1)}
        final = order1[::-1][:3] + order1 if self.has_generator else order1  # the generator moves the last 3 first
        final = list(dict.fromkeys(final))
        hits = []
        for rank, i in enumerate(final[:k], 1):
            v = self.videos[i]
            hit = {"cache": v["cache"], "video_id": v["video_id"], "path": v["path"], "rank": rank,
                   "score": float(len(final) - rank), "stage1_rank": rank1[i], "stage1_score": s1[i], "video_index": i,
                   "evidence": {"words": [{"word": w, "weight": 1 / len(words), "frame": 0, "time": 0.5,
                                           "cosine": 0.5} for w in words],
                                "frames": [{"frame": 0, "time": 0.5, "weight": 1.0}], "best_time": 0.5}}
            if self.has_generator:
                hit["diffusion_rank"], hit["diffusion_score"] = (rank, hit["score"]) if rank <= 32 else (None, None)
            hits.append(hit)
        return hits

    def search_many(self, queries, k=10, candidates=None, qb_norm=False):
        for q in queries:  # like the Searcher: every query is checked before any is searched
            if q == "bad":
                raise self.error("a bad query")
        self.batch_sizes.append(len(queries))
        self.last_candidates = candidates
        time.sleep(self.delay)
        return [self.search(q, k, candidates, qb_norm) for q in queries]
