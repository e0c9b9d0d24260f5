"""Search a video collection with free text: the `Searcher` behind `diffret search`, the Python API
and `diffret serve`.

    from diffret.pipeline.search import Searcher
    s = Searcher(["caches/my-videos"], generator=None)       # loads once
    hits = s.search("a dog runs on the beach", k=10)          # list of JSON-safe dicts, best first

The query is encoded by the cache's own stage-1 model (extract/query.py: text tower and word-weight
head of `stage1.pt`), then:

1. first stage: with an index in every cache (`diffret index`) its best `candidates` videos
   (default 1,000) by the pooled representation (cache/index.py); without one, every video;
2. exact WTI (cache/wti.py, the same blocked scorer `evaluate` uses) on those candidates: the
   stage-1 order (`stage1_rank`, `stage1_score`); with `qb_norm`, QB-Norm on it, the bank being the
   collection's training captions (pipeline/revisers.py);
3. with a generator, the best RERANK (32) re-ranked by the diffusion sampler exactly as `evaluate`
   does (generator/rerank.py `rerank` with the generator's sampler, alpha, temp; each query draws
   its noise from `seed`, so a query's result does not depend on its batch);
4. evidence per hit (pipeline/evidence.py).

A hit: cache, video_id, path, rank (1-based, final order), score, stage1_rank, stage1_score,
diffusion_rank / diffusion_score (with a generator; None outside the re-ranked 32), video_index
(into `videos`), evidence. Bad input raises SearchError (a ValueError with a one-line message).
"""
from __future__ import annotations

import copy
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from diffret.cache.layout import STAGE1_FILE
from diffret.cache.numbers import check_numbers
from diffret.cache.wti import WTIGallery
from diffret.generator.device import resolve_device

from .collection import IN_MEMORY_BYTES, Collection, SearchError
from .evidence import evidence
from .rescore import candidate_wti
from .revisers import qb_norm as qb_norm_revise
from .revisers import query_bank

__all__ = ["Searcher", "SearchError", "SearchOptions", "RERANK", "candidate_wti"]

RERANK = 32  # candidates the generator re-ranks (the original's inference K)
DEFAULT_CANDIDATES = 1000
SPLITS = ("all", "gallery", "train", "test", "val")


@dataclass
class SearchOptions:
    """How `diffret search` answers (each field's metadata is its option: pipeline/commands/options.py)."""

    k: int = field(default=10, metadata={"flag": ("-k", "--k"), "help": "Hits to return."})
    candidates: int | None = field(default=None, metadata={
        "type": int, "parse": int, "show_default": f"{DEFAULT_CANDIDATES} with an index; every video without one",
        "help": "First-stage candidates re-scored by exact WTI (N)."})
    split: str = field(default="all", metadata={"choices": SPLITS, "help": "Search only this split."})
    qb_norm: bool = field(default=False, metadata={
        "help": "QB-Norm on the stage-1 scores, the bank being the caches' training captions."})
    qb_beta: float = field(default=20.0, metadata={"help": "QB-Norm inverse temperature."})
    qb_k: int = field(default=1, metadata={"help": "QB-Norm activation set: top-k of each bank query."})
    sample_steps: int | None = field(default=None, metadata={
        "flag": "--steps", "type": int, "parse": int, "show_default": "the generator's T",
        "help": "Sampling steps of the re-ranking (with --generator)."})
    alpha: float = field(default=1.0, metadata={"help": "Weight of the generated distribution."})
    temp: float = field(default=1.0, metadata={"help": "Softmax temperature on x0."})
    seed: int = 0
    device: str = field(default="cpu", metadata={"help": "cpu, cuda or auto (query encoding, WTI, generator)."})
    batch_size: int = field(default=64, metadata={"help": "Queries encoded and scored at once (--queries)."})

    def __post_init__(self):
        check_numbers(self, SEARCH_NUMBER_RULES)


# The range of each number of SearchOptions (cache/numbers.py; the factors as in evaluate's EVAL_NUMBER_RULES).
SEARCH_NUMBER_RULES = {"k": ">=1", "candidates": ">=1", "qb_beta": "factor", "qb_k": ">=1", "sample_steps": ">=1",
                       "alpha": "|factor|", "temp": "factor", "seed": ">=0", "batch_size": ">=1"}


class Searcher:
    """Search `caches` (a list of cache folders made with the same stage-1 model) as one collection.

    generator: a generator run folder (or None); split: "all" or one split; encoder: an object with
    `encode(texts) -> extract.query.EncodedQueries` and `count_tokens` (default: the first cache's
    stage1.pt); options: SearchOptions for the re-ranking, QB-Norm and device settings.
    """

    def __init__(self, caches, generator=None, device: str = "cpu", split: str = "all", encoder=None,
                 options: SearchOptions | None = None, use_index: bool = True, in_memory_bytes: int = IN_MEMORY_BYTES):
        self.options = options or SearchOptions(split=split, device=device)
        caches = [caches] if isinstance(caches, (str, Path)) else list(caches)
        if split not in SPLITS:
            raise SearchError(f"unknown split {split!r}; known: {', '.join(SPLITS)}")
        try:
            self.device = resolve_device(device)
        except RuntimeError as e:
            raise SearchError(str(e)) from None
        self.collection = Collection(caches, split, in_memory_bytes, use_index=use_index)
        self.split = split
        m = self.collection.manifest
        self.padding = m.wti_padding
        self.n_words = int(m.n_words)
        self.max_query_chars = 64 * self.n_words
        self.encoder = encoder or self._encoder(Path(self.collection.root), m)
        self.generator, self.sampler = None, None
        if generator is not None:
            self._load_generator(Path(generator))
        self._gallery = None  # the whole collection as one WTIGallery (in-memory exhaustive search)
        self._bank = None  # QB-Norm's query bank over the collection (built on first use)
        self._lazy = threading.RLock()  # the two above are built once even when threads search at once (serve)
        self.timings: dict[str, float] = {}  # seconds per stage of the last search_encoded (benchmarks)

    # ------------------------------------------------------------------ set-up

    def _encoder(self, root: Path, manifest):
        path = root / STAGE1_FILE
        if not path.is_file():
            raise SearchError(f"{root} has no {STAGE1_FILE}, so queries cannot be encoded with its model; "
                              f"search a cache written by `diffret extract` (or `extract --stage1`)")
        from diffret.extract.checkpoint import CheckpointError
        from diffret.extract.query import QueryEncoder

        try:
            enc = QueryEncoder(path, self.n_words, self.device)
        except (CheckpointError, RuntimeError, ValueError) as e:
            raise SearchError(str(e).splitlines()[0]) from None
        if manifest.fingerprint and enc.fingerprint != manifest.fingerprint:
            raise SearchError(f"{path} is model {enc.fingerprint[:12]} but the cache was dumped by "
                              f"{manifest.fingerprint[:12]}; the cache is inconsistent: re-extract it")
        return enc

    def _load_generator(self, folder: Path) -> None:
        from diffret.cache.manifest import CacheError
        from diffret.generator.checkpoint import GeneratorError, load_generator

        from .evaluate import check_generator_cache

        try:
            gen = load_generator(folder, self.device)
            for part in self.collection.parts:
                check_generator_cache(gen.meta, part.reader, part.root, folder)
            self.sampler = gen.sampler("ddim", self.options.sample_steps)
        except (GeneratorError, CacheError, ValueError) as e:
            raise SearchError(str(e).splitlines()[0]) from None
        self.generator = gen

    @property
    def videos(self) -> list[dict]:
        return self.collection.videos

    @property
    def has_generator(self) -> bool:
        return self.generator is not None

    # ------------------------------------------------------------------ the API

    def check_query(self, query) -> str:
        if not isinstance(query, str):
            raise SearchError(f"a query must be text, not {type(query).__name__}")
        if not query.strip():
            raise SearchError("the query is empty: give a sentence to search for")
        if len(query) > self.max_query_chars:
            raise SearchError(f"the query is {len(query):,} characters long, more than the {self.max_query_chars:,} "
                              f"this model's {self.n_words} word slots can use; shorten it")
        return query.strip()

    def search(self, query: str, k: int = 10, candidates: int | None = None, qb_norm: bool = False) -> list[dict]:
        return self.search_many([query], k, candidates, qb_norm)[0]

    def search_many(self, queries: list[str], k: int = 10, candidates: int | None = None,
                    qb_norm: bool = False) -> list[list[dict]]:
        """One hit list per query (see the module docstring); queries are encoded and scored in batches."""
        texts = [self.check_query(q) for q in queries]
        self._check_k(k, candidates)
        out = []
        bs = max(1, self.options.batch_size)
        for s in range(0, len(texts), bs):
            enc = self.encoder.encode(texts[s:s + bs])
            out += self.search_encoded(enc, k, candidates, qb_norm)
        return out

    def _check_k(self, k, candidates) -> None:
        n = len(self.videos)
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= n:
            raise SearchError(f"k must be a whole number from 1 to the collection's {n} videos, got {k!r}")
        if candidates is not None and (isinstance(candidates, bool) or not isinstance(candidates, (int, np.integer))
                                       or candidates < 1):
            raise SearchError(f"candidates must be a whole number >= 1, got {candidates!r}")

    def search_encoded(self, enc, k: int = 10, candidates: int | None = None, qb_norm: bool = False) -> list[list[dict]]:
        """Hit lists of already encoded queries (extract.query.EncodedQueries, or any object with its
        arrays `words`, `word_mask`, `word_logits`, `sentence` and `tokens`)."""
        self._check_k(k, candidates)
        self.timings = {"first_stage": 0.0, "read": 0.0, "wti": 0.0, "rerank": 0.0}
        rows, S = self.stage1(enc, candidates)  # per query: candidate rows [n], exact WTI [n]
        out = []
        for q in range(len(rows)):
            out.append(self._hits(enc, q, rows[q], S[q], k, qb_norm))
        return out

    # ------------------------------------------------------------------ the stages

    def stage1(self, enc, candidates: int | None = None) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """-> per query: candidate rows [n] int64 and their exact WTI scores [n] float32 (unsorted)."""
        n_all = len(self.videos)
        n = DEFAULT_CANDIDATES if candidates is None else int(candidates)
        words, mask, logits = enc.words, np.asarray(enc.word_mask, bool), enc.word_logits
        tm = self.timings
        if self.collection.indexed and n < n_all:
            t0 = time.perf_counter()
            cand, _ = self.collection.first_stage(words, mask, logits, n)
            tm["first_stage"] = tm.get("first_stage", 0.0) + time.perf_counter() - t0
            rows, scores = [], []
            for q in range(len(cand)):
                t0 = time.perf_counter()
                r = cand[q][cand[q] >= 0]
                t = self.collection.read(r)
                t1 = time.perf_counter()
                rows.append(r)
                scores.append(candidate_wti(words[q], mask[q], logits[q], t["frames"], t["frame_mask"],
                                            t["frame_logits"], self.padding, self.device).numpy())
                tm["read"] = tm.get("read", 0.0) + t1 - t0
                tm["wti"] = tm.get("wti", 0.0) + time.perf_counter() - t1
            return rows, scores
        t0 = time.perf_counter()
        S = self.exhaustive(words, mask, logits)
        tm["wti"] = tm.get("wti", 0.0) + time.perf_counter() - t0
        return [np.arange(n_all)] * len(S), list(S.numpy())

    def exhaustive(self, words, mask, logits) -> torch.Tensor:
        """Exact WTI of queries against every video of the collection: S [q, Nv] float32."""
        if all(p.data is not None for p in self.collection.parts):
            with self._lazy:
                if self._gallery is None:
                    t = self.collection.read(np.arange(len(self.videos)))
                    self._gallery = WTIGallery(t["frames"], t["frame_mask"], t["frame_logits"], device=self.device,
                                               padding=self.padding)
            return self._gallery.score(words, mask, logits)
        S = torch.empty(len(mask), len(self.videos))
        for s, t in self.collection.blocks():
            g = WTIGallery(t["frames"], t["frame_mask"], t["frame_logits"], device=self.device, padding=self.padding)
            S[:, s:s + len(t["frame_mask"])] = g.score(words, mask, logits)
        return S

    def query_bank(self):
        """QB-Norm's bank over the collection: every training caption of its caches (lazily built)."""
        with self._lazy:
            return self._query_bank()

    def _query_bank(self):
        if self._bank is None:
            blocks = []
            for part in self.collection.parts:
                if "train" in part.reader.manifest.splits and part.reader.manifest.splits["train"].get("captions"):
                    blocks.append(part.reader.text("train"))
            if not blocks:
                raise SearchError("QB-Norm needs training captions for its query bank, and no cache of the collection "
                                  "has any (a folder of videos has none); search without --qb-norm")
            o = self.options

            def scores():
                for text in blocks:
                    for s in range(0, len(text), 256):
                        yield self.exhaustive(text.words[s:s + 256], text.word_mask[s:s + 256],
                                              text.word_logits[s:s + 256])

            self._bank = query_bank(scores(), len(self.videos), o.qb_beta, o.qb_k)
        return self._bank

    def _revise(self, rows: np.ndarray, S: np.ndarray) -> np.ndarray:
        bank = self.query_bank()
        sub = copy.copy(bank)
        idx = torch.from_numpy(rows)
        sub.lse, sub.active = bank.lse[idx], bank.active[idx]
        return qb_norm_revise(torch.from_numpy(S)[None].float(), sub)[0].numpy()

    def _rerank(self, enc, q: int, rows: np.ndarray, base: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """-> (final scores [n] of the candidates, diffusion bonus rows: positions re-ranked [K])."""
        from diffret.generator.rerank import rerank

        o = self.options
        t0 = time.perf_counter()
        top = min(RERANK, len(rows))
        # the candidates in the order evaluate hands them to the sampler (each position draws its own noise):
        # by score when the 32 are a subset (rerank's top-k), in collection order when they are all of them
        best = np.argsort(-base, kind="stable")[:top] if top < len(rows) else np.argsort(rows, kind="stable")
        t = self.collection.read(rows[best])
        frames = torch.from_numpy(t["frames"]).float()
        S = torch.from_numpy(base[best]).float()[None]
        sentence = torch.from_numpy(np.asarray(enc.sentence[q:q + 1])).float()
        out = rerank(S, self.generator.t2v, sentence, None, frames, torch.from_numpy(t["frame_mask"]), self.sampler,
                     top_k=top, alpha=o.alpha, temp=o.temp, seed=o.seed, device=self.device)[0].numpy()
        final = base.astype(np.float64).copy()
        final[best] = out
        self.timings["rerank"] = self.timings.get("rerank", 0.0) + time.perf_counter() - t0
        return final, best

    def _hits(self, enc, q: int, rows: np.ndarray, S: np.ndarray, k: int, qb_norm: bool) -> list[dict]:
        order1 = np.argsort(-S, kind="stable")
        stage1_rank = np.empty(len(S), np.int64)
        stage1_rank[order1] = np.arange(1, len(S) + 1)
        base = self._revise(rows, S) if qb_norm else S.astype(np.float64)
        diff = None
        if self.generator is not None:
            final, best = self._rerank(enc, q, rows, base)
            reranked = best[np.argsort(-final[best], kind="stable")]
            diff = {int(b): (r, float(final[b])) for r, b in enumerate(reranked.tolist(), 1)}
        else:
            final = base
        order = np.argsort(-final, kind="stable")[:k]
        t = self.collection.read(rows[order])
        tokens = enc.tokens[q]
        hits = []
        for rank, pos in enumerate(order.tolist(), 1):
            row = int(rows[pos])
            v = self.videos[row]
            hit = {"cache": v["cache"], "video_id": v["video_id"], "path": v["path"], "rank": rank,
                   "score": float(final[pos]), "stage1_rank": int(stage1_rank[pos]), "stage1_score": float(S[pos]),
                   "video_index": row}
            if self.generator is not None:
                d = diff.get(pos)
                hit["diffusion_rank"], hit["diffusion_score"] = (d[0], d[1]) if d else (None, None)
            hit["evidence"] = evidence(enc.words[q], np.asarray(enc.word_mask[q], bool), enc.word_logits[q], tokens,
                                       t["frames"][rank - 1], t["frame_mask"][rank - 1], t["frame_logits"][rank - 1],
                                       t["frame_times"][rank - 1])
            hits.append(hit)
        return hits
