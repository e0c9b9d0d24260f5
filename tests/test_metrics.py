"""Retrieval metrics on hand-made score matrices with known ranks: ties broken against the query,
the multi-caption protocol (v2t: a video scored by the max over its captions)."""
import pytest
import torch

from diffret.pipeline.metrics import ranks, recall_metrics, retrieval_metrics, v2t_ranks, video_scores

approx = pytest.approx


def test_ranks_by_hand():
    # 4 queries x 5 videos; query i's ground truth is video i (the diagonal).
    scores = torch.tensor([
        [0.9, 0.1, 0.2, 0.3, 0.4],  # gt 0.9 is the highest                   -> rank 1
        [0.8, 0.5, 0.7, 0.1, 0.2],  # 0.8 and 0.7 beat gt 0.5                  -> rank 3
        [0.1, 0.6, 0.4, 0.4, 0.2],  # 0.6 beats gt 0.4; the other 0.4 ties: against it  -> rank 3
        [0.5, 0.6, 0.7, 0.0, 0.8],  # all four others beat gt 0.0              -> rank 5
    ])
    target = torch.arange(4)
    r = ranks(scores, target)
    assert r.dtype == torch.int64
    assert r.tolist() == [1, 3, 3, 5]
    assert ranks(scores, target, chunk=1).tolist() == [1, 3, 3, 5]
    assert ranks(scores.numpy(), target.numpy()).tolist() == [1, 3, 3, 5]

    m = recall_metrics(r)
    # R@1: 1 of 4 ranks <= 1 -> 25%; R@5 and R@10: all 4 -> 100%
    # MdR: median(1, 3, 3, 5) = (3 + 3) / 2 = 3; MnR: (1 + 3 + 3 + 5) / 4 = 3
    assert m == approx({"R@1": 25.0, "R@5": 100.0, "R@10": 100.0, "MdR": 3.0, "MnR": 3.0})


def test_ties_count_against_the_query():
    scores = torch.full((2, 6), 0.5)  # everything tied: every other candidate counts as ahead
    assert ranks(scores, torch.tensor([5, 0])).tolist() == [6, 6]
    # a model that cannot tell items apart gains nothing: a constant matrix gives R@1 = 0, MnR = N
    out = retrieval_metrics(torch.zeros(4, 4), torch.zeros(4, 4), torch.arange(4))
    for d in ("t2v", "v2t"):
        assert out[d] == approx({"R@1": 0.0, "R@5": 100.0, "R@10": 100.0, "MdR": 4.0, "MnR": 4.0})
    # multi-caption: 2 videos of 2 captions each, all tied -> each video's own ranks behind the other
    out = retrieval_metrics(torch.ones(4, 2), torch.ones(2, 4), torch.tensor([0, 0, 1, 1]))
    assert out["t2v"]["MnR"] == 2.0 and out["v2t"]["MnR"] == 2.0 and out["Rsum"] == 0.0 + 100 + 100 + 0 + 100 + 100
    # +inf and -inf tie like any value
    assert ranks(torch.tensor([[float("inf"), float("inf"), 1.0]]), torch.tensor([1])).tolist() == [2]


def test_recall_at_10_and_odd_median():
    # 3 queries x 12 candidates, gt in column 0; rank r = 1 + (r - 1) candidates scoring higher.
    want = [1, 7, 12]
    scores = torch.zeros(3, 12)
    for q, r in enumerate(want):
        scores[q, 1:r] = 1.0  # r - 1 columns beat the gt's 0.0
        scores[q, r:] = -1.0  # the rest are below it
    r = ranks(scores, torch.zeros(3, dtype=torch.long))
    assert r.tolist() == want
    # R@1: {1} -> 1/3; R@5: {1} -> 1/3; R@10: {1, 7} -> 2/3; MdR = 7; MnR = 20/3
    m = recall_metrics(r)
    assert m == approx({"R@1": 100 / 3, "R@5": 100 / 3, "R@10": 200 / 3, "MdR": 7.0, "MnR": 20 / 3})


def test_multi_caption_protocol():
    # 3 videos, 6 captions, 2 per video: captions 0, 1 -> video 0; 2, 3 -> video 1; 4, 5 -> video 2.
    caption_video = torch.tensor([0, 0, 1, 1, 2, 2])
    t2v = torch.tensor([
        [0.9, 0.1, 0.2],  # c0 (v0): best                     -> 1
        [0.2, 0.5, 0.1],  # c1 (v0): 0.5 beats 0.2             -> 2
        [0.3, 0.3, 0.1],  # c2 (v1): v0 ties it (counts ahead) -> 2
        [0.8, 0.4, 0.9],  # c3 (v1): 0.8, 0.9 beat 0.4         -> 3
        [0.1, 0.2, 0.7],  # c4 (v2): best                      -> 1
        [0.6, 0.5, 0.4],  # c5 (v2): 0.6, 0.5 beat 0.4         -> 3
    ])
    v2t = torch.tensor([
        #  c0   c1 | c2   c3 | c4   c5      each video scored by the max over its two captions:
        [0.1, 0.9, 0.5, 0.3, 0.2, 0.0],  # v0: (0.9, 0.5, 0.2); own 0.9, none above         -> 1
        [0.9, 0.8, 0.1, 0.7, 0.6, 0.0],  # v1: (0.9, 0.7, 0.6); own 0.7, v0 above           -> 2
        [0.9, 0.3, 0.8, 0.7, 0.6, 0.4],  # v2: (0.9, 0.8, 0.6); own 0.6, v0 and v1 above    -> 3
    ])
    # The protocol diffret had before counted captions, not videos: v1 at 1 + #{captions above its
    # best own 0.7} = 1 + |{0.9, 0.8}| = 3, v2 at 1 + |{0.9, 0.8, 0.7}| = 4. v0 has two captions above
    # v1's best and v1 two above v2's: the field's protocol (a video is its best caption) counts each once.
    torch.testing.assert_close(video_scores(v2t, caption_video, 3),
                               torch.tensor([[0.9, 0.5, 0.2], [0.9, 0.7, 0.6], [0.9, 0.8, 0.6]]))
    assert v2t_ranks(v2t, caption_video).tolist() == [1, 2, 3]
    assert v2t_ranks(v2t, caption_video, chunk=1).tolist() == [1, 2, 3]

    out = retrieval_metrics(t2v, v2t, caption_video)
    # t2v ranks (1, 2, 2, 3, 1, 3): R@1 = 2/6; R@5 = R@10 = 100%; MdR = median(1, 1, 2, 2, 3, 3) = 2;
    #   MnR = 12/6 = 2
    assert out["t2v"] == approx({"R@1": 100 / 3, "R@5": 100.0, "R@10": 100.0, "MdR": 2.0, "MnR": 2.0})
    # v2t ranks (1, 2, 3): R@1 = 1/3; R@5 = R@10 = 100%; MdR = 2; MnR = 2
    assert out["v2t"] == approx({"R@1": 100 / 3, "R@5": 100.0, "R@10": 100.0, "MdR": 2.0, "MnR": 2.0})
    # Rsum = (100/3 + 100 + 100) + (100/3 + 100 + 100)
    assert out["Rsum"] == approx(400 + 200 / 3)
    assert out["Rsum"] == approx(sum(out[d][k] for d in ("t2v", "v2t") for k in ("R@1", "R@5", "R@10")))


def test_v2t_ties_between_videos_count_against_the_query():
    # captions 0, 1 -> v0; 2 -> v1; 3, 4 -> v2. v1's own score 0.5; v0's best caption ties it, v2's
    # captions are both below: rank 2. v0: own max(0.2, 0.7) = 0.7; v1 0.7 ties, v2 0.9 above: rank 3.
    cv = torch.tensor([0, 0, 1, 2, 2])
    v2t = torch.tensor([[0.2, 0.7, 0.7, 0.9, 0.1],
                        [0.5, 0.1, 0.5, 0.4, 0.3],
                        [0.0, 0.0, 0.0, 0.0, 0.0]])  # v2: everything tied -> behind both others: 3
    assert v2t_ranks(v2t, cv).tolist() == [3, 2, 3]
    perm = torch.tensor([4, 2, 0, 3, 1])  # the caption order does not matter
    assert v2t_ranks(v2t[:, perm], cv[perm]).tolist() == [3, 2, 3]


def test_one_caption_per_video_is_the_usual_protocol():
    s = torch.tensor([[0.9, 0.2, 0.1], [0.8, 0.3, 0.1], [0.1, 0.2, 0.7]])
    out = retrieval_metrics(s, s.t(), torch.arange(3))
    # one caption a video: the max over a video's captions is that caption's score, so v2t ranks are
    # the plain ranks of the v2t matrix, whatever the caption order (identical metrics to before)
    g = torch.Generator().manual_seed(0)
    v2t = torch.rand(50, 50, generator=g)
    perm = torch.randperm(50, generator=g)  # caption c shows video perm[c]
    plain = ranks(v2t, torch.argsort(perm))  # video v's caption column
    assert torch.equal(v2t_ranks(v2t, perm), plain)
    # t2v rows: 0.9 best -> 1; 0.3 beaten by 0.8 -> 2; 0.7 best -> 1  => R@1 = 2/3, MnR = 4/3
    # v2t rows of s.t() (columns of s): v0 (0.9, 0.8, 0.1) gt 0.9 -> 1; v1 (0.2, 0.3, 0.2) gt 0.3 -> 1;
    #   v2 (0.1, 0.1, 0.7) gt 0.7 -> 1  => R@1 = 100
    assert out["t2v"]["MnR"] == approx(4 / 3) and out["t2v"]["R@1"] == approx(200 / 3)
    assert out["v2t"]["R@1"] == approx(100.0)
    assert out["Rsum"] == approx(200 / 3 + 100 + 100 + 300)


def test_ranks_rejects_bad_input():
    scores = torch.rand(3, 4)
    with pytest.raises(ValueError, match="one column per row"):
        ranks(scores, torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="one column per row"):
        ranks(scores, torch.zeros(3, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"in \[0, 4\)"):
        ranks(scores, torch.tensor([0, 4, 1]))
    with pytest.raises(ValueError, match="need t2v"):
        retrieval_metrics(torch.rand(2, 3), torch.rand(2, 3), torch.tensor([0, 1]))


def test_a_video_without_captions_is_a_distractor_but_no_v2t_query():
    # captions 0 -> v0, 1 -> v1; v2 has none: no v2t query, and never found (its max over no caption is -inf)
    t2v = torch.tensor([[0.5, 0.1, 0.9], [0.1, 0.5, 0.2]])  # v2 beats c0's video: a t2v distractor
    v2t = torch.tensor([[0.3, 0.2], [0.4, 0.6], [9.0, 9.0]])
    assert video_scores(v2t, torch.tensor([0, 1]), 3)[:, 2].tolist() == [float("-inf")] * 3
    out = retrieval_metrics(t2v, v2t, torch.tensor([0, 1]))
    assert out["t2v"]["MnR"] == 1.5 and out["v2t"]["MnR"] == 1.0  # t2v ranks (2, 1); v2t (1, 1): 2 queries
def test_nan_scores_are_refused():
    # A NaN never compares higher than anything, so a NaN ground-truth score would pass for rank 1.
    scores = torch.tensor([[float("nan"), 1.0, 2.0], [0.1, 0.9, 0.3]])
    with pytest.raises(ValueError, match="NaN"):
        ranks(scores, torch.tensor([0, 1]))
    # v2t: a NaN caption would vanish in the max over a video's captions; refused before it
    with pytest.raises(ValueError, match="NaN"):
        v2t_ranks(torch.tensor([[0.5, float("nan")], [0.1, 0.2]]), torch.tensor([0, 0]))
    # -inf (a masked-out candidate) is a legitimate score
    scores = torch.tensor([[0.5, float("-inf"), 2.0]])
    assert ranks(scores, torch.tensor([0])).tolist() == [2]
