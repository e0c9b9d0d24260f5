"""The first-stage search index: approximate nearest neighbours (faiss) over every video of a cache.

Search is two-stage: a cheap first stage over the whole collection picks N candidates, exact WTI
(wti.py) re-scores them. The first stage scores one vector a video against one vector a query,
the `pooled` representation (the choice measured in benchmarks/search_speed.py, BENCHMARKS.md):

    video = normalise(sum_j b_j f_j / |f_j|)      b = softmax over valid frames of the frame logits
    query = normalise(sum_i a_i w_i / |w_i|)      a = softmax over valid words of the word logits

i.e. WTI's weighted sums with the maxima replaced by the weighted centroid of the other side, so
cos(query, video) is a smooth proxy of S whose top N hold WTI's top 10 (recall measured, never
assumed). Kinds: "flat" (exact inner product), "ivf" (inverted lists over k-means cells, nprobe
of them searched), "hnsw" (a graph); "auto" picks flat up to AUTO_FLAT videos, else ivf.

On disk: index/first-stage.faiss (written atomically) and the manifest's `index` entry:
{"kind", "representation", "params", "rows": {split: n} (every split, in the cache's split order),
"content": sha256 of what the vectors were made from (stage-1 fingerprint, video shards, videos
index), "files": {"index/first-stage.faiss": sha256}}. A cache whose content changed since is stale:
`load_index` refuses it (IndexError_, one line), and `cache verify` reports it.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .atomic import atomic_write
from .layout import INDEX_DIR, INDEX_FILES
from .manifest import CacheError, Manifest, read_manifest, sha256_file, write_manifest
from .numbers import check_numbers
from .shards import FIELDS, field_dtype, read_shard_into

INDEX_KINDS = ("auto", "flat", "ivf", "hnsw")
REPRESENTATIONS = ("pooled",)
INDEX_FILE = f"{INDEX_DIR}/{INDEX_FILES[0]}"
AUTO_FLAT = 200_000  # auto: an exact flat index up to this many videos (about 25 ms a query at 200k, D = 512)
HNSW_M = 32


@dataclass
class IndexOptions:
    """What `diffret index` builds (each field's metadata is its option: pipeline/commands/options.py)."""

    kind: str = field(default="auto", metadata={
        "choices": INDEX_KINDS, "help": f"flat (exact), ivf (k-means cells), hnsw (graph); auto: flat up to "
                                        f"{AUTO_FLAT:,} videos, else ivf."})
    nlist: int | None = field(default=None, metadata={"type": int, "parse": int, "show_default": "4 sqrt(videos)",
                                                      "help": "ivf: number of cells."})
    nprobe: int | None = field(default=None, metadata={"type": int, "parse": int,
                                                       "show_default": "nlist / 16, at least 32",
                                                       "help": "ivf: cells searched per query."})
    ef_search: int | None = field(default=None, metadata={"type": int, "parse": int, "show_default": "256",
                                                          "help": "hnsw: search breadth."})

    def __post_init__(self):
        check_numbers(self, {"nlist": ">=1", "nprobe": ">=1", "ef_search": ">=1"})

    def params(self) -> dict:
        """The parameters given (the others default by size: `default_params`)."""
        given = {"nlist": self.nlist, "nprobe": self.nprobe, "efSearch": self.ef_search}
        return {k: v for k, v in given.items() if v is not None}


class IndexError_(CacheError):
    """A missing, damaged or stale search index (one-line message)."""


# ------------------------------------------------------------------ the representation (formula's one copy)


def softmax_valid(logits: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """[..., T] logits, [..., T] bool mask -> [..., T] float32 weights: softmax over the valid slots,
    0 elsewhere (numpy twin of cache/wti.py `masked_softmax`, for numpy and faiss callers)."""
    x = np.where(mask, logits.astype(np.float32), -np.inf)
    x = x - x.max(axis=-1, keepdims=True)
    e = np.where(mask, np.exp(x), 0.0)
    return (e / np.maximum(e.sum(axis=-1, keepdims=True), 1e-30)).astype(np.float32)


def unit(x: np.ndarray) -> np.ndarray:
    """[..., D] -> the same vectors at unit L2 norm (zero vectors stay zero)."""
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def pooled(tokens: np.ndarray, mask: np.ndarray, logits: np.ndarray) -> np.ndarray:
    """tokens [n, T, D] (any float dtype), mask [n, T] bool, logits [n, T] -> [n, D] float32, unit
    norm: the weighted centroid of the unit tokens (weights = softmax of the logits over valid slots).
    The same function pools a video's frames and a query's words."""
    t = unit(tokens.astype(np.float32))
    w = softmax_valid(logits, mask.astype(bool))
    return unit(np.einsum("nt,ntd->nd", w, t)).astype(np.float32)


# ------------------------------------------------------------------ what the index was built from


def content_key(m: Manifest) -> str:
    """sha256 of what the index's vectors come from: the stage-1 fingerprint, every video shard
    (file, rows, sha256) and the videos index. Any extraction that changes the videos changes it."""
    shards = sorted((s.file, s.rows, s.sha256) for s in m.shards if s.kind == "video")
    blob = json.dumps([m.fingerprint, shards, m.files.get("videos.parquet", "")], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def video_rows(m: Manifest) -> dict[str, int]:
    """{split: video rows} in the cache's split order (sorted names): the index's row order."""
    rows = {}
    for split in sorted(m.splits):
        rows[split] = sum(s.rows for s in m.shards if s.kind == "video" and s.split == split)
    return rows


def pooled_videos(root: Path, m: Manifest, progress=None) -> np.ndarray:
    """[Nv, D] pooled vectors of every video of the cache in index order, a shard at a time."""
    out = []
    shards = [s for split in sorted(m.splits) for s in m.shards if s.kind == "video" and s.split == split]
    task = progress.add_task("pool video tokens", total=len(shards)) if progress else None
    tails = {"frames": (m.n_frames, m.width), "frame_mask": (m.n_frames,), "frame_logits": (m.n_frames,)}
    for rec in shards:
        arrays = {k: np.empty((rec.rows,) + tails[k], field_dtype(k, m.dtype)) for k in tails}
        read_shard_into(Path(root) / rec.file, arrays, 0)
        out.append(pooled(arrays["frames"], arrays["frame_mask"].view(bool), arrays["frame_logits"]))
        if progress:
            progress.update(task, advance=1)
    if progress:
        progress.remove_task(task)
    return np.concatenate(out) if out else np.zeros((0, m.width), np.float32)


# ------------------------------------------------------------------ building and loading


def resolve_kind(kind: str, n: int) -> str:
    if kind not in INDEX_KINDS:
        raise ValueError(f"unknown index kind {kind!r}; known: {', '.join(INDEX_KINDS)}")
    return ("flat" if n <= AUTO_FLAT else "ivf") if kind == "auto" else kind


def default_params(kind: str, n: int, nlist: int | None = None) -> dict:
    """ivf: nlist ~ 4 sqrt(n) cells, nprobe 1/16 of them, at least 32; hnsw: M 32, efSearch 256
    (the recall of these is measured in BENCHMARKS.md)."""
    if kind == "ivf":
        nlist = nlist or max(1, min(n // 39, int(4 * math.sqrt(max(n, 1)))))
        return {"nlist": nlist, "nprobe": min(nlist, max(32, nlist // 16))}
    if kind == "hnsw":
        return {"M": HNSW_M, "efConstruction": 80, "efSearch": 256}
    return {}


def make_index(vectors: np.ndarray, kind: str, params: dict, seed: int = 0):
    """A faiss inner-product index of kind flat | ivf | hnsw over vectors [n, D] float32."""
    import faiss

    n, d = vectors.shape
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    if kind == "flat":
        index = faiss.IndexFlatIP(d)
    elif kind == "ivf":
        quantizer = faiss.IndexFlatIP(d)
        index = faiss.IndexIVFFlat(quantizer, d, int(params["nlist"]), faiss.METRIC_INNER_PRODUCT)
        rng = np.random.default_rng(seed)
        sample = x[rng.choice(n, min(n, 64 * int(params["nlist"])), replace=False)] if n else x
        index.cp.seed = seed
        index.train(sample)
        index.nprobe = int(params["nprobe"])
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, int(params["M"]), faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = int(params["efConstruction"])
        index.hnsw.efSearch = int(params["efSearch"])
    else:
        raise ValueError(f"unknown index kind {kind!r}")
    if n:
        index.add(x)
    return index


def build_index(root: Path, kind: str = "auto", params: dict | None = None, progress=None, log=None) -> dict:
    """Build the first-stage index of the cache `root`, write it atomically into index/ and record it
    in the manifest (the caller holds the cache's lock). -> the manifest's index entry."""
    import faiss

    root = Path(root)
    m = read_manifest(root)
    vectors = pooled_videos(root, m, progress)
    kind = resolve_kind(kind, len(vectors))
    given = dict(params or {})
    defaults = default_params(kind, len(vectors), given.get("nlist"))
    params = {**defaults, **{k: v for k, v in given.items() if k in defaults}}
    if kind == "ivf":
        params["nprobe"] = min(int(params["nprobe"]), int(params["nlist"]))
    if kind == "ivf" and len(vectors) < int(params["nlist"]):
        raise ValueError(f"an ivf index of {params['nlist']} cells needs at least as many videos; the cache has "
                         f"{len(vectors)} (use --kind flat)")
    index = make_index(vectors, kind, params)
    (root / INDEX_DIR).mkdir(exist_ok=True)
    path = root / INDEX_FILE
    atomic_write(path, lambda tmp: faiss.write_index(index, str(tmp)))
    entry = {"kind": kind, "representation": "pooled", "params": params, "rows": video_rows(m),
             "content": content_key(m), "files": {INDEX_FILE: sha256_file(path)}}
    m.index = entry
    write_manifest(root, m)
    if log:
        log(f"{kind} index of {len(vectors)} videos written to {path}")
    return entry


def check_index(root: Path, m: Manifest, checksum: bool = True) -> dict:
    """The manifest's index entry when the index is usable; IndexError_ (one line) when it is
    missing, damaged (files, sha256) or stale (the cache's videos changed since it was built)."""
    root, entry = Path(root), m.index
    if not entry:
        raise IndexError_(f"{root} has no search index; build one with `diffret index --cache {root}`")
    if entry.get("content") != content_key(m) or entry.get("rows") != video_rows(m):
        raise IndexError_(f"the search index of {root} is stale (the cache's videos changed since it was built); "
                          f"rebuild it with `diffret index --cache {root}`")
    for name, digest in (entry.get("files") or {}).items():
        path = root / name
        if not path.is_file():
            raise IndexError_(f"the search index of {root} is damaged: {name} is missing; rebuild it with "
                              f"`diffret index --cache {root}`")
        if checksum and sha256_file(path) != digest:
            raise IndexError_(f"the search index of {root} is damaged: {name} differs from the sha256 recorded "
                              f"when it was written; rebuild it with `diffret index --cache {root}`")
    return entry


def has_index_files(root: Path) -> bool:
    return (Path(root) / INDEX_FILE).exists()


def load_index(root: Path, m: Manifest | None = None, checksum: bool = True):
    """-> (faiss index, manifest entry) of the cache `root`; IndexError_ when unusable."""
    import faiss

    root = Path(root)
    m = m or read_manifest(root)
    entry = check_index(root, m, checksum)
    try:
        index = faiss.read_index(str(root / INDEX_FILE))
    except RuntimeError as e:
        raise IndexError_(f"the search index of {root} is damaged ({str(e).splitlines()[-1][:120]}); rebuild it "
                          f"with `diffret index --cache {root}`") from None
    if index.ntotal != sum(entry["rows"].values()) or index.d != m.width:
        raise IndexError_(f"the search index of {root} holds {index.ntotal} vectors of width {index.d}, the cache "
                          f"{sum(entry['rows'].values())} of width {m.width}; rebuild it")
    if entry["kind"] == "ivf":
        index.nprobe = int(entry["params"]["nprobe"])
    elif entry["kind"] == "hnsw":
        index.hnsw.efSearch = int(entry["params"]["efSearch"])
    return index, entry


def search_index(index, queries: np.ndarray, n: int, lo: int = 0, hi: int | None = None):
    """Best n rows (by inner product) among rows lo..hi of the index for queries [q, D] ->
    (scores [q, n] float32, rows [q, n] int64; -1 where fewer than n exist)."""
    import faiss

    hi = index.ntotal if hi is None else hi
    x = np.ascontiguousarray(queries, dtype=np.float32)
    if lo == 0 and hi == index.ntotal:
        return index.search(x, n)
    sel = faiss.IDSelectorRange(lo, hi)
    cls = {"IndexIVFFlat": faiss.SearchParametersIVF, "IndexHNSWFlat": faiss.SearchParametersHNSW}.get(
        type(index).__name__, faiss.SearchParameters)
    params = cls(sel=sel)
    if isinstance(params, faiss.SearchParametersIVF):
        params.nprobe = index.nprobe
    elif isinstance(params, faiss.SearchParametersHNSW):
        params.efSearch = index.hnsw.efSearch
    return index.search(x, n, params=params)


def verify_index(root: Path, m: Manifest) -> str | None:
    """For `cache verify`: IndexError_ when the manifest lists an index that is missing, damaged or
    stale; a note (str) when index files lie there unlisted; None when there is nothing to say."""
    if not m.index:
        return (f"{INDEX_FILE} is not listed in the manifest (ignored; rebuild it with `diffret index`)"
                if has_index_files(root) else None)
    load_index(root, m)
    return None
