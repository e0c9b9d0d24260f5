"""The Searcher on small written caches (no CLIP): exact WTI over the first stage, evidence,
several caches as one collection, QB-Norm, and the errors of bad input."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from diffret.cache.index import build_index, pooled
from diffret.cache.store import CacheReader
from diffret.cache.wti import wti_similarity_chunked
from diffret.pipeline.search import Searcher, SearchError
from search_data import CachedEncoder, write_cache

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return write_cache(tmp_path_factory.mktemp("c") / "cache", [("test", 40), ("train", 30)])


def _all_videos(root):
    r = CacheReader(root)
    feats = [r.video(s) for s in r.splits]
    cat = {k: np.concatenate([getattr(f, k) for f in feats]) for k in ("frames", "frame_mask", "frame_logits")}
    return [v for f in feats for v in f.video_id], cat


def _queries(root, split="test"):
    t = CacheReader(root).text(split)
    return t.caption, t


def test_exhaustive_search_is_the_wti_top_k_with_equal_scores(cache):
    s = Searcher([cache], encoder=CachedEncoder(cache))
    ids, v = _all_videos(cache)
    texts, t = _queries(cache)
    S = wti_similarity_chunked(t.words, t.word_mask, t.word_logits, v["frames"], v["frame_mask"], v["frame_logits"])
    assert [x["video_id"] for x in s.videos] == ids
    for q, hits in enumerate(s.search_many(texts, k=7, candidates=len(ids))):
        best = torch.argsort(-S[q], stable=True)[:7]
        assert [h["video_id"] for h in hits] == [ids[i] for i in best]
        assert [h["score"] for h in hits] == [float(S[q, i]) for i in best]  # bit for bit: evaluate's WTI
        assert [h["rank"] for h in hits] == list(range(1, 8))
        assert all(h["stage1_rank"] == h["rank"] and h["stage1_score"] == h["score"] for h in hits)
        json.dumps(hits, allow_nan=False)  # JSON-safe


def test_flat_index_first_stage_is_the_best_n_then_the_wti_order(cache, tmp_path):
    import shutil

    root = tmp_path / "c"
    shutil.copytree(cache, root)
    build_index(root, "flat")
    s = Searcher([root], encoder=CachedEncoder(root))
    assert s.collection.indexed
    ids, v = _all_videos(root)
    texts, t = _queries(root)
    n = 12
    vp = pooled(v["frames"], v["frame_mask"], v["frame_logits"])
    qp = pooled(t.words, t.word_mask, t.word_logits)
    enc = s.encoder.encode(texts)
    rows, S = s.stage1(enc, candidates=n)
    full = wti_similarity_chunked(t.words, t.word_mask, t.word_logits, v["frames"], v["frame_mask"], v["frame_logits"])
    for q in range(len(texts)):
        want = np.argsort(-(qp[q] @ vp.T), kind="stable")[:n]
        assert sorted(rows[q].tolist()) == sorted(want.tolist())  # exactly the best n by the pooled tokens
        # exact WTI of those n = evaluate's, up to float32 rounding: the blocked product's summation order
        # depends on the block a caption shares with others (evaluate's own bits do too)
        np.testing.assert_allclose(S[q], full[q, rows[q]].numpy(), rtol=1e-6, atol=1e-7)
    hits = s.search_many(texts, k=5, candidates=n)
    for q, h in enumerate(hits):
        order = rows[q][np.argsort(-S[q], kind="stable")][:5]
        assert [x["video_index"] for x in h] == order.tolist()


def test_evidence_points_at_the_max_cosine_frame_and_its_time(cache):
    s = Searcher([cache], encoder=CachedEncoder(cache))
    texts, t = _queries(cache)
    r = CacheReader(cache)
    feats = {sp: r.video(sp) for sp in r.splits}
    for q, hits in enumerate(s.search_many(texts[:5], k=4)):
        words = t.words[q][t.word_mask[q]].astype(np.float32)
        words /= np.linalg.norm(words, axis=1, keepdims=True)
        for h in hits:
            f = feats[s.videos[h["video_index"]]["split"]]
            i = f.video_id.index(h["video_id"])
            valid = np.nonzero(f.frame_mask[i])[0]
            fr = f.frames[i][valid].astype(np.float32)
            cos = words @ (fr / np.linalg.norm(fr, axis=1, keepdims=True)).T
            ev = h["evidence"]
            assert len(ev["words"]) == len(words)
            for n, w in enumerate(ev["words"]):
                assert w["frame"] == valid[cos[n].argmax()]
                assert w["cosine"] == pytest.approx(cos[n].max(), abs=1e-4)
                assert w["time"] == pytest.approx(float(f.frame_times[i][w["frame"]]), abs=1e-3)
            last = float(f.frame_times[i][valid].max())
            times = [w["time"] for w in ev["words"]] + [x["time"] for x in ev["frames"]] + [ev["best_time"]]
            assert all(0 <= x <= last for x in times)
            weights = [x["weight"] for x in ev["frames"]]
            assert weights == sorted(weights, reverse=True) and len(weights) == min(3, len(valid))


def test_several_caches_are_one_collection(tmp_path):
    a = write_cache(tmp_path / "a", [("gallery", 13)], seed=1)
    b = write_cache(tmp_path / "b", [("gallery", 11)], seed=2)
    texts = [f"caption of gallery-1-{i}" for i in (0, 4)] + [f"caption of gallery-2-{i}" for i in (3, 9)]
    enc = CachedEncoder(a, b)
    both = Searcher([a, b], encoder=enc)
    assert len(both.videos) == 24 and {v["cache"] for v in both.videos} == {str(a), str(b)}
    # one cache holding both: the same rows, in the same order
    ra, rb = CacheReader(a), CacheReader(b)
    va, vb, ta, tb = ra.video("gallery"), rb.video("gallery"), ra.text("gallery"), rb.text("gallery")
    from diffret.cache.store import CacheWriter

    w = CacheWriter(tmp_path / "ab", ra.manifest, shard_rows=8)
    for v in (va, vb):
        w.add_video("gallery", v.video_id, [f"/videos/{x}.mp4" for x in v.video_id], v.frames, v.frame_mask,
                    v.frame_logits, frame_times=v.frame_times)
    for t in (ta, tb):
        w.add_text("gallery", t.caption_id, t.video_id, t.caption, t.sentence, t.words, t.word_mask, t.word_logits)
    w.close()
    one = Searcher([tmp_path / "ab"], encoder=enc)
    for x, y in zip(both.search_many(texts, k=10), one.search_many(texts, k=10)):
        assert [(h["video_id"], h["score"], h["evidence"]) for h in x] == [(h["video_id"], h["score"], h["evidence"])
                                                                         for h in y]
    build_index(a, "flat")
    build_index(b, "flat")
    both = Searcher([a, b], encoder=enc)  # first stage across both indexes
    for q, hits in enumerate(both.search_many(texts, k=3, candidates=24)):
        assert hits[0]["video_id"] == one.search(texts[q], k=3)[0]["video_id"]
    c = write_cache(tmp_path / "c", [("gallery", 5)], seed=3, fingerprint="anothermodel0000")
    with pytest.raises(SearchError, match="same model"):
        Searcher([a, c], encoder=enc)


def test_split_narrows_the_collection(cache):
    s = Searcher([cache], encoder=CachedEncoder(cache), split="train")
    assert {v["split"] for v in s.videos} == {"train"} and len(s.videos) == 30
    texts, _ = _queries(cache)
    assert all(h["video_id"].startswith("train") for h in s.search(texts[0], k=30))
    with pytest.raises(SearchError, match="no videos in split 'gallery'"):
        Searcher([cache], encoder=CachedEncoder(cache), split="gallery")


def test_qb_norm_uses_the_training_captions(cache, tmp_path):
    s = Searcher([cache], encoder=CachedEncoder(cache))
    texts, _ = _queries(cache)
    plain, normed = s.search(texts[0], k=70), s.search(texts[0], k=70, qb_norm=True)
    assert {h["video_id"] for h in plain} == {h["video_id"] for h in normed}
    assert s.query_bank().size == 30
    assert [h["stage1_score"] for h in sorted(normed, key=lambda h: h["stage1_rank"])] == [h["score"] for h in plain]
    g = write_cache(tmp_path / "g", [("gallery", 6)], captions=False)
    with pytest.raises(SearchError, match="training captions"):
        Searcher([g], encoder=CachedEncoder(cache)).search(texts[0], k=2, qb_norm=True)


@pytest.mark.parametrize("query", ["", "   \t\n"])
def test_empty_queries_are_refused(cache, query):
    s = Searcher([cache], encoder=CachedEncoder(cache))
    with pytest.raises(SearchError, match="empty"):
        s.search(query)


def test_bad_k_and_long_queries_are_refused(cache):
    s = Searcher([cache], encoder=CachedEncoder(cache))
    texts, _ = _queries(cache)
    for k in (0, -1, 71, 2.5, True):
        with pytest.raises(SearchError, match="k must be"):
            s.search(texts[0], k=k)
    with pytest.raises(SearchError, match="characters long"):
        s.search("a" * (s.max_query_chars + 1))
    with pytest.raises(SearchError, match="text"):
        s.search(None)


def test_bad_caches_are_refused(cache, tmp_path):
    with pytest.raises(SearchError, match="stage1.pt"):
        Searcher([cache])  # written without a stage-1 model: queries cannot be encoded
    with pytest.raises(SearchError, match="not a diffret cache"):
        Searcher([tmp_path], encoder=CachedEncoder(cache))
    with pytest.raises(SearchError, match="at least one"):
        Searcher([], encoder=CachedEncoder(cache))
    import shutil

    old = tmp_path / "old"
    shutil.copytree(cache, old)
    m = json.loads((old / "manifest.json").read_text())
    m["schema_version"] = 1
    (old / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(SearchError, match="schema version 1.*re-run `diffret extract`"):
        Searcher([old], encoder=CachedEncoder(cache))


@pytest.mark.parametrize("padding", ["zero", "exclude"])
def test_candidate_wti_fast_path_equals_the_plain_formula(cache, padding):
    from diffret.cache.wti import wti_similarity
    from diffret.pipeline.search import candidate_wti

    _, v = _all_videos(cache)
    _, t = _queries(cache)
    f = {k: torch.from_numpy(x) for k, x in v.items()}
    for q in range(5):
        got = candidate_wti(t.words[q], t.word_mask[q], t.word_logits[q], v["frames"], v["frame_mask"],
                            v["frame_logits"], padding)
        want = wti_similarity(torch.from_numpy(t.words[q:q + 1]).float(), torch.from_numpy(t.word_mask[q:q + 1]),
                              torch.from_numpy(t.word_logits[q:q + 1]).float(), f["frames"].float(), f["frame_mask"],
                              f["frame_logits"].float(), padding=padding)[0]
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_row_by_row_reading_gives_the_same_hits(cache, tmp_path):
    """A collection too large for memory is read at the rows' file offsets (cache/rows.py): same answers."""
    import shutil

    root = tmp_path / "c"
    shutil.copytree(cache, root)
    build_index(root, "flat")
    texts, _ = _queries(root)
    enc = CachedEncoder(root)
    mem, lazy = Searcher([root], encoder=enc), Searcher([root], encoder=enc, in_memory_bytes=0)
    assert mem.collection.parts[0].data is not None and lazy.collection.parts[0].rows is not None
    for n in (None, 9):  # exhaustive (streamed in blocks) and through the index
        a, b = mem.search_many(texts, k=6, candidates=n), lazy.search_many(texts, k=6, candidates=n)
        assert a == b
    rows = np.array([69, 0, 8, 7, 33, 8])
    got, want = lazy.collection.read(rows), mem.collection.read(rows)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k])
