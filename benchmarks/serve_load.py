"""Load on `diffret serve`: many concurrent clients searching, fetching thumbnails and seeking videos.

Starts `diffret serve` on a free loopback port (a child process: the model and caches load once),
then runs `--clients` client threads, each with its own keep-alive connection, each doing
`--queries` rounds of: one /api/search (a caption of the cache's test split, cycled, k 12), one
/thumb of a hit at its evidence moment, and every `--media-every` rounds one /media byte-range
request of 64 KiB at a random offset (as a browser seeking). Each client also sends one malformed
Range header and drops one download after its first bytes, and the server must keep answering.
Reports throughput, p50/p95/p99 latency per endpoint and the errors (any unexpected status or
failed request), without and, with `--generator`, with the diffusion re-ranking.

The load generator runs on the same cores as the server (Python threads, so it takes a share of
the CPU the server would otherwise have): the latencies are an upper bound for a server with the
machine to itself.

    python benchmarks/serve_load.py --cache runs/demo/cache [--generator runs/demo/generator] \\
        [--clients 32] [--queries 50] [--threads 1] [--candidates N|all] [--compare-unbatched] [--json out.json]
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import random
import socket
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlencode, urlsplit

import numpy as np
import pyarrow.parquet as pq

from diffret.pipeline.serve.server import serve_process

TARGET_P95_MS = 250.0


def queries_of(caches: list[str]) -> list[str]:
    """The captions of the caches' test split (all captions where a cache has no test split)."""
    out: list[str] = []
    for c in caches:
        rows = pq.read_table(Path(c) / "captions.parquet", columns=["caption", "split"]).to_pylist()
        out += [r["caption"] for r in rows if r["split"] == "test"] or [r["caption"] for r in rows]
    if not out:
        raise SystemExit("the caches have no captions to search with")
    return out


class Client(threading.Thread):
    def __init__(self, i: int, url: str, queries: list[str], rounds: int, media_every: int, barrier):
        super().__init__(daemon=True)
        u = urlsplit(url)
        self.host, self.port = u.hostname, u.port
        self.i, self.queries, self.rounds, self.media_every, self.barrier = i, queries, rounds, media_every, barrier
        self.rng = random.Random(i)
        self.times: dict[str, list[float]] = {"search": [], "thumb": [], "media": []}
        self.errors: list[str] = []
        self.conn = None

    def request(self, kind: str, path: str, headers: dict | None = None, expect=(200,)) -> bytes | None:
        for attempt in (0, 1):  # one retry on a keep-alive connection the server closed while idle
            if self.conn is None:
                self.conn = http.client.HTTPConnection(self.host, self.port, timeout=60)
            t = time.perf_counter()
            try:
                self.conn.request("GET", path, headers=headers or {})
                r = self.conn.getresponse()
                body = r.read()
            except (ConnectionError, http.client.HTTPException, OSError) as e:
                self.conn.close()
                self.conn = None
                if attempt == 0 and isinstance(e, (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError)):
                    continue
                self.errors.append(f"{kind}: {type(e).__name__}: {e}")
                return None
            self.times[kind].append(time.perf_counter() - t)
            if r.status not in expect:
                self.errors.append(f"{kind}: HTTP {r.status} {body[:120]!r}")
                return None
            return body
        return None

    def drop_mid_download(self, mid: str) -> None:
        s = socket.create_connection((self.host, self.port), timeout=30)
        try:
            s.sendall(f"GET /media/{mid} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            if not s.recv(1024).startswith(b"HTTP/1.1 200"):
                self.errors.append("drop: no 200")
        finally:
            s.close()

    def run(self):
        self.barrier.wait()
        sizes: dict[str, int] = {}
        for n in range(self.rounds):
            q = self.queries[(self.i * self.rounds + n) % len(self.queries)]
            body = self.request("search", "/api/search?" + urlencode({"q": q, "k": 12}))
            if body is None:
                continue
            hits = [h for h in json.loads(body)["hits"] if h.get("media_id")]
            if not hits:
                continue
            h = self.rng.choice(hits)
            self.request("thumb", f"/thumb/{h['media_id']}?t={h['evidence']['best_time']}")
            if n % self.media_every == 0:
                mid = h["media_id"]
                if mid not in sizes:
                    sizes[mid] = os.path.getsize(h["path"]) if h.get("path") and os.path.exists(h["path"]) else 1
                a = self.rng.randrange(max(1, sizes[mid]))
                self.request("media", f"/media/{mid}", {"Range": f"bytes={a}-{a + 65535}"}, expect=(206,))
            if n == 1:  # a malformed range: ignored, the whole file
                self.request("media", f"/media/{h['media_id']}", {"Range": "bytes=oops"}, expect=(200,))
            if n == 2:
                self.drop_mid_download(h["media_id"])
        if self.conn is not None:
            self.conn.close()


def percentiles(xs: list[float]) -> dict:
    if not xs:
        return {"n": 0}
    a = np.asarray(xs) * 1000
    return {"n": len(xs), "p50_ms": round(float(np.percentile(a, 50)), 1), "p95_ms": round(float(np.percentile(a, 95)), 1),
            "p99_ms": round(float(np.percentile(a, 99)), 1), "max_ms": round(float(a.max()), 1)}


def rss_mib(pid: int) -> float | None:
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of process `pid` so far (all its threads)."""
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_once(caches: list[str], generator: str | None, clients: int, rounds: int, media_every: int,
             threads: int = 1, batch: int = 32, candidates: str | None = None) -> dict:
    queries = queries_of(caches)
    procs: list = []
    extra = ("--threads", threads, "--batch", batch) + (("--candidates", candidates) if candidates else ())
    with serve_process(caches, generator, extra, procs=procs) as url:
        barrier = threading.Barrier(clients)
        workers = [Client(i, url, queries, rounds, media_every, barrier) for i in range(clients)]
        load_before = os.getloadavg()
        cpu0, client0 = cpu_s(procs[0].pid), time.process_time()
        t = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        wall = time.perf_counter() - t
        server_cpu, client_cpu = cpu_s(procs[0].pid) - cpu0, time.process_time() - client0
        conn = http.client.HTTPConnection(urlsplit(url).hostname, urlsplit(url).port, timeout=30)
        conn.request("GET", "/api/info")
        alive = conn.getresponse().status == 200  # still answering after the load and the dropped downloads
        conn.close()
        peak = rss_mib(procs[0].pid)
    times = {k: sum((w.times[k] for w in workers), []) for k in ("search", "thumb", "media")}
    errors = sum((w.errors for w in workers), [])
    n = sum(len(v) for v in times.values())
    out = {"generator": bool(generator), "server_threads": threads, "batch": batch,
           "candidates": candidates or "default", "clients": clients, "rounds": rounds, "requests": n,
           "wall_s": round(wall, 2), "requests_per_s": round(n / wall, 1),
           "searches_per_s": round(len(times["search"]) / wall, 1),
           "server_cpu_s": round(server_cpu, 2), "load_generator_cpu_s": round(client_cpu, 2),
           "server_cpu_ms_per_request": round(1000 * server_cpu / max(1, n), 2), "errors": len(errors),
           "error_examples": errors[:5], "alive_after": alive, "server_peak_rss_mib": peak,
           "load_before": [round(x, 2) for x in load_before], "load_after": [round(x, 2) for x in os.getloadavg()]}
    out.update({k: percentiles(v) for k, v in times.items()})
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cache", action="append", required=True)
    p.add_argument("--generator")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--queries", type=int, default=50, help="rounds per client (one search each)")
    p.add_argument("--media-every", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="the server's --threads (torch threads of a search)")
    p.add_argument("--candidates", help="the server's --candidates (default: the Searcher's)")
    p.add_argument("--compare-unbatched", action="store_true",
                   help="also run without a generator at --batch 1 (one search at a time), for the batching ratio")
    p.add_argument("--json", type=Path)
    a = p.parse_args(argv)
    rows = [run_once(a.cache, None, a.clients, a.queries, a.media_every, a.threads, candidates=a.candidates)]
    if a.compare_unbatched:
        rows.append(run_once(a.cache, None, a.clients, a.queries, a.media_every, a.threads, 1, a.candidates))
    if a.generator:
        rows.append(run_once(a.cache, a.generator, a.clients, a.queries, a.media_every, a.threads,
                             candidates=a.candidates))
    for r in rows:
        print(f"{'with' if r['generator'] else 'without'} generator, batch {r['batch']}, candidates {r['candidates']}: "
              f"{r['requests']} requests in {r['wall_s']} s "
              f"({r['requests_per_s']}/s, {r['searches_per_s']} searches/s; CPU: server {r['server_cpu_s']} s, "
              f"{r['server_cpu_ms_per_request']} ms a request, load generator {r['load_generator_cpu_s']} s), "
              f"errors {r['errors']}, "
              f"alive after: {r['alive_after']}")
        for k in ("search", "thumb", "media"):
            print(f"  /{k}: {r[k]}")
    base = rows[0]
    ok = base["errors"] == 0 and base["alive_after"] and base["search"].get("p95_ms", 1e9) < TARGET_P95_MS
    report = {"machine": f"{platform.machine()}, {os.cpu_count()} cores", "python": platform.python_version(),
              "date": time.strftime("%Y-%m-%d"), "command": " ".join([Path(sys.argv[0]).name] + (argv or sys.argv[1:])),
              "target": f"zero errors and /api/search p95 < {TARGET_P95_MS:g} ms without a generator",
              "target_met": ok, "runs": rows}
    if a.json:
        a.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"target ({report['target']}): {'met' if ok else 'NOT met'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
