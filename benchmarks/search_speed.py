"""Search: recall of the approximate first stage, and latency / memory up to a million videos.

    # (a) recall on real features: a cache of demo videos dumped by a trained demo stage-1 model
    python benchmarks/search_speed.py recall --cache BIG_CACHE [--queries 1000] [--n 1000]
    # (b) + (c) synthetic caches (12 frames, width 512, the project's writer), planted queries, latency
    python benchmarks/search_speed.py latency --root /work/bench-data/synth --sizes 10000,100000,1000000

(a) For Q test captions (their cached tokens: a searched caption is encoded to the same float16
tokens, tests/test_search_cli.py), the mean over queries of |search top-10 ∩ exhaustive-WTI top-10| / 10
for each first stage (pooled tokens with a flat / ivf / hnsw index; late interaction over
per-frame tokens: every word searches the frame index, videos scored by sum_i a_i max over their
retrieved frames), at N candidates, with each one's index size and first-stage time; and R@1 / R@10
of search against the exhaustive ranking (evaluate's discriminative row on the same queries).

(b) planted queries: each built from one video's frame tokens plus noise (a word per valid frame,
cos about 0.6 with it), so the video is the exhaustive-WTI best; that is checked exhaustively at the
smallest size. Reported: the fraction whose planted video is in search's top 10.

(c) per query p50 / p95 (ms) of the first stage, reading the candidates' token rows, exact WTI,
the diffusion re-ranking (a random-weight width-512 generator, 50 DDIM steps: the cost, not the
quality) and end to end, single queries and batches of 64; index build time and size; the search
process's peak RSS. Each size is measured in a fresh process, after a warm-up pass over its
queries (page cache warm). Query encoding is reported beside (the demo model's text tower).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from diffret.cache.index import build_index, make_index, pooled
from diffret.cache.manifest import Manifest, read_manifest
from diffret.cache.store import CacheReader, CacheWriter
from diffret.cache.wti import WTIGallery
from diffret.extract.query import EncodedQueries

HERE = Path(__file__).resolve().parent


def _enc(words, mask, logits, sentence=None) -> EncodedQueries:
    n = len(mask)
    sentence = sentence if sentence is not None else words[:, 0]
    return EncodedQueries(sentence, words, mask, logits, [[f"w{i}" for i in range(int(m.sum()))] for m in mask],
                          [False] * n)


def _topk(S: torch.Tensor, k: int) -> np.ndarray:
    return torch.topk(S, k, dim=1).indices.numpy()


# ------------------------------------------------------------------ (a) recall on real features


def frame_index(v):
    """Every valid frame token, L2-normalised [n, D] float32, the video row that owns each [n], and a
    flat index over them (the two per-frame first stages share it)."""
    fr = v.frames.astype(np.float32)[v.frame_mask]
    fr /= np.linalg.norm(fr, axis=1, keepdims=True)
    return fr, np.nonzero(v.frame_mask)[0], make_index(fr, "flat", {})


def late_interaction(words, mask, logits, v, n: int, per_word: int = 64):
    """Candidates by late interaction over per-frame tokens: each valid word retrieves its
    `per_word` nearest frames (flat index over every valid frame); a video's approximate score is
    sum_i a_i max over its retrieved frames (0 where none). -> (rows [q, n], index bytes, seconds)."""
    fr, owner, index = frame_index(v)
    t0 = time.time()
    out = []
    for q in range(len(mask)):
        m = mask[q]
        w = words[q][m].astype(np.float32)
        w /= np.linalg.norm(w, axis=1, keepdims=True)
        lg = logits[q][m].astype(np.float32)
        a = np.exp(lg - lg.max())
        a /= a.sum()
        s, r = index.search(w, per_word)
        score = {}
        for i in range(len(w)):
            best = {}
            for sc, fi in zip(s[i], r[i]):
                vid = owner[fi]
                best[vid] = max(best.get(vid, -1.0), sc)
            for vid, sc in best.items():
                score[vid] = score.get(vid, 0.0) + a[i] * sc
        top = sorted(score, key=score.get, reverse=True)[:n]
        out.append(np.array(top + [-1] * (n - len(top))))
    return np.stack(out), fr.nbytes, time.time() - t0


def frames_max(qp, v, n: int, per_query: int = 8):
    """Candidates by the pooled query against every valid frame token (flat index over frames): a
    video's score is its best frame's cosine. -> (rows [q, n], index bytes, seconds)."""
    fr, owner, index = frame_index(v)
    t0 = time.time()
    _, r = index.search(qp, per_query * n)
    out = []
    for q in range(len(qp)):
        vids = list(dict.fromkeys(owner[r[q]].tolist()))[:n]
        out.append(np.array(vids + [-1] * (n - len(vids))))
    return np.stack(out), fr.nbytes, time.time() - t0


def recall(args) -> dict:
    torch.set_num_threads(args.threads)
    r = CacheReader(args.cache)
    split = args.split
    t, v = r.text(split), r.video(split)
    q = min(args.queries, len(t))
    pick = np.linspace(0, len(t) - 1, q).astype(int)
    words, mask, logits = t.words[pick], t.word_mask[pick], t.word_logits[pick]
    gt = v.index_of([t.video_id[i] for i in pick])
    print(f"{len(v)} videos, {q} queries, width {r.manifest.width}", flush=True)
    t0 = time.time()
    gallery = WTIGallery(v.frames, v.frame_mask, v.frame_logits, padding=r.manifest.wti_padding)
    S = gallery.score(words, mask, logits)
    exhaustive_s = time.time() - t0
    ex10 = _topk(S, 10)
    vp = pooled(v.frames, v.frame_mask, v.frame_logits)
    qp = pooled(words, mask, logits)
    out = {"videos": len(v), "queries": q, "N": args.n, "exhaustive_seconds": round(exhaustive_s, 1), "rows": {}}

    def finish(name, cand, index_bytes, first_s, build_s):
        hits, r1, r10 = [], 0, 0
        for i in range(q):
            c = cand[i][cand[i] >= 0]
            order = c[np.argsort(-S[i, c].numpy(), kind="stable")][:10]  # exact WTI of the candidates
            hits.append(len(set(order.tolist()) & set(ex10[i].tolist())) / 10)
            r1 += int(order[0] == gt[i])
            r10 += int(gt[i] in order)
        row = {"recall@10_vs_exhaustive": round(float(np.mean(hits)), 4), "R@1": round(100 * r1 / q, 1),
               "R@10": round(100 * r10 / q, 1), "index_MiB": round(index_bytes / 2**20, 1),
               "first_stage_ms_per_query": round(1000 * first_s / q, 2), "build_s": round(build_s, 1)}
        out["rows"][name] = row
        print(name, row, flush=True)

    ranks = (S >= S[np.arange(q), gt][:, None]).sum(1).numpy()
    out["exhaustive"] = {"R@1": round(100 * float((ranks == 1).mean()), 1),
                         "R@10": round(100 * float((ranks <= 10).mean()), 1)}
    print("exhaustive (= evaluate's discriminative row on these queries)", out["exhaustive"], flush=True)
    nlist = int(4 * np.sqrt(len(v)))
    ivf = [(f"pooled/ivf nprobe {p}/{nlist}", "ivf", {"nlist": nlist, "nprobe": p})
           for p in sorted({max(32, nlist // 16), nlist // 8, nlist // 4})]
    for name, kind, params in [("pooled/flat", "flat", {})] + ivf + [
            ("pooled/hnsw", "hnsw", {"M": 32, "efConstruction": 80, "efSearch": 256})]:
        t0 = time.time()
        index = make_index(vp, kind, params)
        build = time.time() - t0
        t0 = time.time()
        _, cand = index.search(qp, args.n)
        size = _index_bytes(index)
        finish(name, cand, size, time.time() - t0, build)
    index = make_index(vp, "flat", {})
    for n in (2 * args.n, 4 * args.n):  # how many candidates the pooled tokens need for the target
        t0 = time.time()
        _, cand = index.search(qp, n)
        finish(f"pooled/flat N={n}", cand, _index_bytes(index), time.time() - t0, 0.0)
    cand, size, secs = frames_max(qp, v, args.n)
    finish("frames/max over frames of the pooled query (flat)", cand, size, secs, 0.0)
    cand, size, secs = late_interaction(words, mask, logits, v, args.n)
    finish("frames/late-interaction (flat)", cand, size, secs, 0.0)
    return out


def _index_bytes(index) -> int:
    import faiss

    return len(faiss.serialize_index(index))


# ------------------------------------------------------------------ (b)+(c) synthetic caches


def write_video_cache(root: Path, n: int, width: int = 512, frames: int = 12, seed: int = 0):
    """n videos only (no captions), the project's writer; frame tokens N(0, 1), 10-12 valid frames."""
    root = Path(root)
    if (root / "manifest.json").is_file() and read_manifest(root).splits.get("gallery", {}).get("videos") == n:
        return root
    man = Manifest(width=width, n_words=32, n_frames=frames, dataset="synthetic", extract_config={"n_videos": n},
                   model={"name": "synthetic", "pretrained": "none", "fingerprint": f"synthetic-search-{seed}"})
    w = CacheWriter(root, man, shard_rows=4096, resume=True)  # an interrupted write continues (its shards kept)
    times = np.arange(frames, dtype=np.float32)[None, :] * 1.0
    chunk = 4096
    for s in range(w.completed("video", "gallery") * 4096, n, chunk):  # chunk = the shard size
        rng = np.random.default_rng([seed, s])  # each chunk its own stream: a resumed write draws the same
        m = min(chunk, n - s)
        fr = rng.standard_normal((m, frames, width), dtype=np.float32).astype(np.float16)
        fm = np.arange(frames)[None, :] < (frames - rng.integers(0, 3, m))[:, None]
        ids = [f"v{i}" for i in range(s, s + m)]
        w.add_video("gallery", ids, [f"/synthetic/{x}.mp4" for x in ids], fr, fm,
                    rng.standard_normal((m, frames), dtype=np.float32).astype(np.float16),
                    frame_times=np.where(fm, times, -1).astype(np.float32))
    w.close()
    return root


def planted_queries(root: Path, n_queries: int, seed: int = 1, noise: float = 1.3):
    """Queries built from videos' frame tokens plus noise: words [q, 32, D] (one per valid frame, then
    [EOT]-like copies up to 14 words), mask, logits; -> (EncodedQueries, planted rows [q])."""
    from diffret.cache.rows import VideoRows

    r = CacheReader(root)
    rows = VideoRows(r, ["gallery"])
    rng = np.random.default_rng(seed)
    planted = rng.choice(len(rows), n_queries, replace=False)
    t = rows.read(planted)
    L, D = r.manifest.n_words, r.manifest.width
    words = np.zeros((n_queries, L, D), np.float16)
    mask = np.zeros((n_queries, L), bool)
    for i in range(n_queries):
        f = t["frames"][i][t["frame_mask"][i]].astype(np.float32)
        nw = len(f)
        words[i, :nw] = (f + noise * rng.standard_normal(f.shape)).astype(np.float16)
        mask[i, :nw] = True
    logits = rng.standard_normal((n_queries, L)).astype(np.float16)
    rows.close()
    return _enc(words, mask, logits, words[:, 0]), planted


def random_generator(width: int, steps: int = 50):
    from diffret.generator.config import GeneratorConfig
    from diffret.generator.denoiser import T2VDenoiser, V2TDenoiser
    from diffret.generator.generator import Generator

    torch.manual_seed(0)
    cfg = GeneratorConfig(train_steps=steps)
    return Generator(cfg, T2VDenoiser(width).eval(), V2TDenoiser(width).eval(), {})


def _pcts(xs) -> dict:
    a = np.asarray(xs) * 1000
    return {"p50": round(float(np.percentile(a, 50)), 1), "p95": round(float(np.percentile(a, 95)), 1)}


def measure(root: Path, n_queries: int, candidates: int, kind: str, check: bool, threads: int) -> dict:
    """One size, in this (fresh) process: index build, planted recall, stage latencies, RSS."""
    from diffret.pipeline.search import Searcher

    torch.set_num_threads(threads)
    m = read_manifest(root)
    out = {"videos": sum(s.rows for s in m.shards if s.kind == "video")}
    if not m.index or m.index.get("kind") != kind:
        t0 = time.time()
        build_index(root, kind)
        out["index_build_s"] = round(time.time() - t0, 1)
    out["index_MiB"] = round((root / "index/first-stage.faiss").stat().st_size / 2**20, 1)
    out["index"] = read_manifest(root).index["params"] | {"kind": kind}
    enc, planted = planted_queries(root, n_queries)
    s = Searcher([root], encoder=object(), in_memory_bytes=0)
    if check:  # the planted video is the exhaustive-WTI best (every video scored)
        S = s.exhaustive(enc.words, enc.word_mask, enc.word_logits)
        out["planted_is_exhaustive_best"] = float((S.argmax(1).numpy() == planted).mean())
    timings = {k: [] for k in ("first_stage", "read", "wti", "rerank", "end_to_end", "end_to_end_with_generator")}
    found = []

    for rep in range(2):  # the first pass warms the page cache
        for i in range(n_queries):
            t0 = time.perf_counter()
            hits = s.search_encoded(_slice(enc, i, i + 1), 10, candidates)[0]
            total = time.perf_counter() - t0
            if rep:
                for k in ("first_stage", "read", "wti"):
                    timings[k].append(s.timings[k])
                timings["end_to_end"].append(total)
                found.append(planted[i] in {h["video_index"] for h in hits})
    out["planted_in_top10"] = round(float(np.mean(found)), 4)
    gen = random_generator(m.width)
    s.generator, s.sampler = gen, gen.sampler("ddim", None)
    for i in range(min(n_queries, 100)):
        t0 = time.perf_counter()
        s.search_encoded(_slice(enc, i, i + 1), 10, candidates)
        timings["end_to_end_with_generator"].append(time.perf_counter() - t0)
        timings["rerank"].append(s.timings["rerank"])
    out["per_query_ms"] = {k: _pcts(v) for k, v in timings.items() if v}
    s.generator = None
    t0 = time.perf_counter()
    b = 64
    nb = max(1, min(n_queries, 320) // b)
    for j in range(nb):
        s.search_encoded(_slice(enc, j * b, (j + 1) * b), 10, candidates)
    out["batch64_ms_per_query"] = round(1000 * (time.perf_counter() - t0) / (nb * b), 1)
    out["peak_rss_MiB"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 0)
    return out


def _slice(enc: EncodedQueries, a: int, b: int) -> EncodedQueries:
    return EncodedQueries(enc.sentence[a:b], enc.words[a:b], enc.word_mask[a:b], enc.word_logits[a:b], enc.tokens[a:b],
                          enc.truncated[a:b])


def encoding_ms(cache: Path, n: int = 50) -> dict:
    """Query encoding with a cache's stage1.pt (text tower + word-weight head), one query at a time."""
    from diffret.extract.query import QueryEncoder

    m = read_manifest(cache)
    enc = QueryEncoder(cache / "stage1.pt", m.n_words)
    caps = CacheReader(cache).index("text")["caption"].to_pylist()[:n]
    enc.encode(caps[:2])
    ts = []
    for c in caps:
        t0 = time.perf_counter()
        enc.encode([c])
        ts.append(time.perf_counter() - t0)
    return _pcts(ts) | {"model": m.model.get("name")}


def latency(args) -> dict:
    results = {}
    for n in [int(x) for x in args.sizes.split(",")]:
        root = Path(args.root) / f"videos-{n}"
        t0 = time.time()
        write_video_cache(root, n)
        print(f"{n} videos written to {root} in {time.time() - t0:.0f} s", flush=True)
        kind = "flat" if n <= 100_000 else "ivf"
        cmd = [sys.executable, __file__, "_one", "--root", str(root), "--queries", str(args.queries), "--n",
               str(args.n), "--kind", kind, "--threads", str(args.threads)] + (["--check"] if n <= 10_000 else [])
        res = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
        results[n] = res
        print(n, json.dumps(res), flush=True)
    if args.encoder_cache:
        results["query_encoding_ms"] = encoding_ms(Path(args.encoder_cache))
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="what", required=True)
    a = sub.add_parser("recall")
    a.add_argument("--cache", type=Path, required=True)
    a.add_argument("--split", default="test")
    a.add_argument("--queries", type=int, default=1000)
    a.add_argument("--n", type=int, default=1000)
    a.add_argument("--threads", type=int, default=2)
    b = sub.add_parser("latency")
    b.add_argument("--root", type=Path, default=Path("/work/bench-data/synth"))
    b.add_argument("--sizes", default="10000,100000,1000000")
    b.add_argument("--queries", type=int, default=1000)
    b.add_argument("--n", type=int, default=1000)
    b.add_argument("--threads", type=int, default=2)
    b.add_argument("--encoder-cache", type=Path, help="A cache whose stage1.pt times query encoding.")
    c = sub.add_parser("_one")
    c.add_argument("--root", type=Path)
    c.add_argument("--queries", type=int)
    c.add_argument("--n", type=int)
    c.add_argument("--kind")
    c.add_argument("--threads", type=int)
    c.add_argument("--check", action="store_true")
    args = ap.parse_args()
    if args.what == "_one":
        print(json.dumps(measure(args.root, args.queries, args.n, args.kind, args.check, args.threads)))
        return
    out = recall(args) if args.what == "recall" else latency(args)
    load = os.getloadavg()
    out["machine"] = {"cpus": os.cpu_count(), "load_average": [round(x, 2) for x in load],
                      "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
