"""`diffret search` on the tiny demo cache through the real command: queries encoded by the cache's
stage1.pt, the diffusion re-ranking, --json, --queries, and every bad input as one line."""
from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import run_cli
from diffret.cache.store import CacheReader
from diffret.cache.wti import wti_similarity_chunked
from diffret.pipeline.search import Searcher, SearchError

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


def _test_captions(cache_dir):
    rows = pq.read_table(cache_dir / "captions.parquet").to_pylist()
    return [r for r in rows if r["split"] == "test"]


def test_encoded_queries_are_the_cached_captions_and_search_is_exact(cache_dir):
    s = Searcher([cache_dir], split="test")
    t = CacheReader(cache_dir).text("test")
    enc = s.encoder.encode(t.caption)
    # a query is encoded as the dump encoded the caption: the same float16 tokens
    np.testing.assert_array_equal(enc.word_mask, t.word_mask)
    np.testing.assert_allclose(enc.words.astype(np.float32), t.words.astype(np.float32), atol=2e-3)
    v = CacheReader(cache_dir).video("test")
    S = wti_similarity_chunked(enc.words, enc.word_mask, enc.word_logits, v.frames, v.frame_mask, v.frame_logits)
    for q, hits in enumerate(s.search_many(t.caption, k=5)):
        best = np.argsort(-S[q].numpy(), kind="stable")[:5]
        assert [h["video_id"] for h in hits] == [v.video_id[i] for i in best]
        assert [h["score"] for h in hits] == [float(S[q, i]) for i in best]
        assert hits[0]["evidence"]["words"][0]["word"] == "[SOS]"


def test_generator_reranks_the_top_32(cache_dir, generator_dir):
    s = Searcher([cache_dir], generator=generator_dir)
    assert s.has_generator
    caption = _test_captions(cache_dir)[0]["caption"]
    hits = s.search(caption, k=len(s.videos))
    reranked = [h for h in hits if h["diffusion_rank"] is not None]
    assert len(reranked) == 32 and sorted(h["diffusion_rank"] for h in reranked) == list(range(1, 33))
    assert {h["stage1_rank"] for h in reranked} == set(range(1, 33))  # the 32 best by stage 1
    # S' = S + alpha * softmax(x0) over the 32: the bonuses are a distribution (alpha = 1)
    assert sum(h["score"] - h["stage1_score"] for h in reranked) == pytest.approx(1.0, abs=1e-4)
    assert all(h["score"] == h["stage1_score"] for h in hits if h["diffusion_rank"] is None)
    assert [h["rank"] for h in hits[:32]] == [h["diffusion_rank"] for h in hits[:32]]
    again = s.search_many([caption, "a red square"], k=5)[0]  # a query's answer does not depend on its batch
    assert [(h["video_id"], h["score"]) for h in again] == [(h["video_id"], h["score"]) for h in hits[:5]]


def test_search_command_table_json_and_queries(cache_dir, generator_dir, tmp_path):
    caps = _test_captions(cache_dir)
    r = run_cli("search", "--cache", cache_dir, caps[0]["caption"], "-k", 3, "--split", "test")
    assert "rank" in r.output and "stage 1" in r.output and "top 3 of 12 videos" in r.output
    r = run_cli("search", "--cache", cache_dir, caps[0]["caption"], "-k", 4, "--json", "-")
    hits = json.loads(r.stdout)
    assert [h["rank"] for h in hits] == [1, 2, 3, 4] and {"evidence", "stage1_rank", "path"} <= hits[0].keys()
    qfile = tmp_path / "q.txt"
    qfile.write_text("\n".join(c["caption"] for c in caps[:3]) + "\n\n", encoding="utf-8")
    out = tmp_path / "hits.json"
    run_cli("search", "--cache", cache_dir, "--queries", qfile, "-k", 2, "--json", out, "--generator", generator_dir,
            "--steps", 5)
    data = json.loads(out.read_text())
    assert [d["query"] for d in data] == [c["caption"] for c in caps[:3]]
    assert all(len(d["hits"]) == 2 and d["hits"][0]["diffusion_rank"] == 1 for d in data)


def test_a_long_query_is_truncated_with_a_note(cache_dir):
    r = run_cli("search", "--cache", cache_dir, "a red square " * 8000, "-k", 2, "--json", "-")
    assert "note: the query is 104,000 characters long" in r.stderr
    assert "the model reads its first 30" in r.stderr
    assert len(json.loads(r.stdout)) == 2


@pytest.mark.parametrize("args, message", [
    (["   "], "the query is empty"),
    ([""], "the query is empty"),
    (["a dog", "-k", "0"], "-k must be >= 1, got 0"),
    (["a dog", "--alpha", "nan"], "--alpha must be a finite number"),
    (["a dog", "--batch-size", "0"], "--batch-size must be >= 1"),
    (["a dog", "-k", "100000"], "k must be a whole number from 1 to the collection's 36 videos"),
    ([], "give one QUERY or --queries FILE"),
    (["a dog", "--split", "gallery"], "no videos in split 'gallery'"),
    (["a dog", "--candidates", "0"], "--candidates must be >= 1"),
])
def test_bad_input_is_one_line(cache_dir, args, message):
    r = run_cli("search", "--cache", cache_dir, *args, ok=False)
    assert r.exit_code != 0 and message in r.output and "Traceback" not in r.output


def test_bad_files_are_one_line(cache_dir, tmp_path):
    bad = tmp_path / "q.txt"
    bad.write_bytes(b"a dog\n\xff\xfe cat\n")
    r = run_cli("search", "--cache", cache_dir, "--queries", bad, ok=False)
    assert r.exit_code != 0 and "line 2: not UTF-8 text" in r.output
    r = run_cli("search", "--cache", tmp_path / "none", "a dog", ok=False)
    assert r.exit_code != 0 and "not a directory" in r.output and "Traceback" not in r.output
    import shutil

    copy = tmp_path / "c"
    shutil.copytree(cache_dir, copy)
    (copy / "stage1.pt").unlink()
    r = run_cli("search", "--cache", copy, "a dog", ok=False)
    assert r.exit_code != 0 and "has no stage1.pt" in r.output
    with pytest.raises(SearchError):
        Searcher([copy])


def test_evidence_times_lie_inside_the_source_videos(cache_dir):
    import av

    s = Searcher([cache_dir])
    caption = _test_captions(cache_dir)[1]["caption"]
    for h in s.search(caption, k=6):
        with av.open(h["path"]) as f:
            duration = f.duration / 1e6
        ev = h["evidence"]
        times = [w["time"] for w in ev["words"]] + [x["time"] for x in ev["frames"]] + [ev["best_time"]]
        assert all(t is not None and 0 <= t <= duration for t in times), (times, duration)
