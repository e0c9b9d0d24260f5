"""The first-stage index (cache/index.py, `diffret index`): kinds, the manifest record, `cache verify`,
stale and damaged indexes refused with one line."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from conftest import run_cli
from diffret.cache.index import IndexError_, build_index, load_index, pooled, resolve_kind, search_index
from diffret.cache.manifest import read_manifest
from diffret.cache.store import CacheReader
from diffret.cache.verify import verify_cache
from diffret.pipeline.search import Searcher, SearchError
from search_data import CachedEncoder, write_cache


@pytest.fixture()
def cache(tmp_path):
    return write_cache(tmp_path / "cache", [("test", 30), ("train", 50)], seed=5)


def _pooled(root):
    r = CacheReader(root)
    vs = [r.video(s) for s in r.splits]
    return np.concatenate([pooled(v.frames, v.frame_mask, v.frame_logits) for v in vs])


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
def test_each_kind_is_recorded_verified_and_searchable(cache, kind):
    params = {"nlist": 4, "nprobe": 4} if kind == "ivf" else None
    entry = build_index(cache, kind, params)
    m = read_manifest(cache)
    assert m.index == entry and entry["kind"] == kind and entry["rows"] == {"test": 30, "train": 50}
    assert list(entry["files"]) == ["index/first-stage.faiss"] and (cache / "index/first-stage.faiss").is_file()
    assert verify_cache(cache)["notes"] == []
    index, _ = load_index(cache)
    vp = _pooled(cache)
    scores, rows = search_index(index, vp[:3], 5)
    assert rows[:, 0].tolist() == [0, 1, 2]  # each video's own vector is its nearest (all cells probed)
    _, rows = search_index(index, vp[:3], 5, 30, 80)  # only the train rows
    assert ((rows >= 30) & (rows < 80)).all()


def test_flat_returns_the_exact_best_n(cache):
    build_index(cache, "flat")
    index, _ = load_index(cache)
    vp = _pooled(cache)
    q = vp[::7] + 0.1
    scores, rows = search_index(index, q, 10)
    for i in range(len(q)):
        exact = q[i] @ vp.T
        assert rows[i].tolist() == np.argsort(-exact, kind="stable")[:10].tolist()
        np.testing.assert_allclose(scores[i], np.sort(exact)[::-1][:10], rtol=1e-5)


def test_auto_picks_by_size():
    assert resolve_kind("auto", 1000) == "flat" and resolve_kind("auto", 10**6) == "ivf"
    with pytest.raises(ValueError, match="unknown index kind"):
        resolve_kind("lsh", 10)


def test_a_stale_index_is_refused(cache, tmp_path):
    build_index(cache, "flat")
    other = write_cache(tmp_path / "other", [("test", 30), ("train", 51)], seed=5)
    m, o = read_manifest(cache), read_manifest(other)
    o.index = m.index  # an index recorded for videos the cache no longer holds
    shutil.copytree(cache / "index", other / "index")
    from diffret.cache.manifest import write_manifest

    write_manifest(other, o)
    with pytest.raises(IndexError_, match="stale.*diffret index --cache"):
        load_index(other)
    with pytest.raises(Exception, match="stale"):
        verify_cache(other)
    with pytest.raises(SearchError, match="stale"):
        Searcher([other], encoder=CachedEncoder(other))


def test_a_damaged_or_missing_index_is_refused(cache):
    build_index(cache, "flat")
    path = cache / "index/first-stage.faiss"
    data = path.read_bytes()
    path.write_bytes(data[:100])
    with pytest.raises(IndexError_, match="damaged"):
        load_index(cache)
    with pytest.raises(Exception, match="damaged"):
        verify_cache(cache)
    path.unlink()
    with pytest.raises(SearchError, match="damaged: index/first-stage.faiss is missing"):
        Searcher([cache], encoder=CachedEncoder(cache))


def test_unlisted_index_files_fall_back_to_exhaustive_search(cache):
    build_index(cache, "flat")
    m = read_manifest(cache)
    m.index = {}
    from diffret.cache.manifest import write_manifest

    write_manifest(cache, m)
    s = Searcher([cache], encoder=CachedEncoder(cache))
    assert not s.collection.indexed and "not listed" in s.collection.notes[0]
    assert "not listed" in verify_cache(cache)["notes"][0]


def test_index_command(cache, tmp_path):
    r = run_cli("index", "--cache", cache, "--kind", "ivf", "--nlist", 8)
    assert "ivf index of 80 videos" in r.output
    assert read_manifest(cache).index["params"] == {"nlist": 8, "nprobe": 8}
    for args, message in ((["--cache", tmp_path / "nope"], "not a directory"),
                          (["--cache", cache, "--kind", "ivf", "--nlist", 500], "at least as many videos"),
                          (["--cache", cache, "--nprobe", 0], "--nprobe must be >= 1")):
        r = run_cli("index", *args, ok=False)
        assert r.exit_code != 0 and message in r.output and "Traceback" not in r.output
    assert json.loads((cache / "manifest.json").read_text())["index"]["params"]["nlist"] == 8  # untouched


def test_search_through_the_index_keeps_to_the_split(cache):
    build_index(cache, "flat")
    s = Searcher([cache], encoder=CachedEncoder(cache), split="train")
    assert s.collection.indexed and len(s.videos) == 50
    caps = CacheReader(cache).text("test").caption[:4]
    for hits in s.search_many(caps, k=5, candidates=8):
        assert all(h["video_id"].startswith("train") for h in hits)
        assert all(s.videos[h["video_index"]]["video_id"] == h["video_id"] for h in hits)
