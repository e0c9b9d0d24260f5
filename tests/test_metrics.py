"""Retrieval metrics on hand-made score matrices with known ranks."""
import pytest
import torch

from diffret.pipeline.metrics import ranks, recall_metrics, retrieval_metrics

approx = pytest.approx


def test_ranks_by_hand():
    # 4 queries x 5 videos; query i's ground truth is video i (the diagonal).
    scores = torch.tensor([
        [0.9, 0.1, 0.2, 0.3, 0.4],  # gt 0.9 is the highest                   -> rank 1
        [0.8, 0.5, 0.7, 0.1, 0.2],  # 0.8 and 0.7 beat gt 0.5                  -> rank 3
        [0.1, 0.6, 0.4, 0.4, 0.2],  # 0.6 beats gt 0.4; the other 0.4 is a tie -> rank 2
        [0.5, 0.6, 0.7, 0.0, 0.8],  # all four others beat gt 0.0              -> rank 5
    ])
    positive = torch.eye(4, 5, dtype=torch.bool)
    r = ranks(scores, positive)
    assert r.dtype == torch.int64
    assert r.tolist() == [1, 3, 2, 5]
    assert ranks(scores, positive, chunk=1).tolist() == [1, 3, 2, 5]
    assert ranks(scores.numpy(), positive.numpy()).tolist() == [1, 3, 2, 5]

    m = recall_metrics(r)
    # R@1: 1 of 4 ranks <= 1 -> 25%; R@5 and R@10: all 4 -> 100%
    # MdR: median(1, 2, 3, 5) = (2 + 3) / 2 = 2.5; MnR: (1 + 3 + 2 + 5) / 4 = 11/4 = 2.75
    assert m == approx({"R@1": 25.0, "R@5": 100.0, "R@10": 100.0, "MdR": 2.5, "MnR": 2.75})


def test_ties_count_in_the_query_favour():
    scores = torch.full((2, 6), 0.5)  # everything tied
    positive = torch.zeros(2, 6, dtype=torch.bool)
    positive[0, 5] = positive[1, 0] = True
    assert ranks(scores, positive).tolist() == [1, 1]


def test_recall_at_10_and_odd_median():
    # 3 queries x 12 candidates, gt in column 0; rank r = 1 + (r - 1) candidates scoring higher.
    want = [1, 7, 12]
    scores = torch.zeros(3, 12)
    for q, r in enumerate(want):
        scores[q, 1:r] = 1.0  # r - 1 columns beat the gt's 0.0; the rest tie it at 0.0
    positive = torch.zeros(3, 12, dtype=torch.bool)
    positive[:, 0] = True
    r = ranks(scores, positive)
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
        [0.3, 0.3, 0.1],  # c2 (v1): tie with v0               -> 1
        [0.8, 0.4, 0.9],  # c3 (v1): 0.8, 0.9 beat 0.4         -> 3
        [0.1, 0.2, 0.7],  # c4 (v2): best                      -> 1
        [0.6, 0.5, 0.4],  # c5 (v2): 0.6, 0.5 beat 0.4         -> 3
    ])
    v2t = torch.tensor([
        #  c0   c1   c2   c3   c4   c5
        [0.1, 0.9, 0.5, 0.3, 0.2, 0.0],  # v0: own best c1 = 0.9, nothing higher          -> 1
        [0.9, 0.8, 0.1, 0.7, 0.6, 0.0],  # v1: own best c3 = 0.7; 0.9, 0.8 higher         -> 3
        [0.9, 0.3, 0.8, 0.7, 0.6, 0.4],  # v2: own best c4 = 0.6; 0.9, 0.8, 0.7 higher    -> 4
    ])
    # (Ranking v1 by its first caption c2 alone would give 6, v0 by c0 alone 5: the best one counts.)
    pos_v2t = caption_video[None, :] == torch.arange(3)[:, None]
    assert ranks(v2t, pos_v2t).tolist() == [1, 3, 4]

    out = retrieval_metrics(t2v, v2t, caption_video)
    # t2v ranks (1, 2, 1, 3, 1, 3): R@1 = 3/6 = 50%; R@5 = R@10 = 100%;
    #   MdR = median(1, 1, 1, 2, 3, 3) = (1 + 2) / 2 = 1.5; MnR = 11/6
    assert out["t2v"] == approx({"R@1": 50.0, "R@5": 100.0, "R@10": 100.0, "MdR": 1.5, "MnR": 11 / 6})
    # v2t ranks (1, 3, 4): R@1 = 1/3; R@5 = R@10 = 100%; MdR = 3; MnR = 8/3
    assert out["v2t"] == approx({"R@1": 100 / 3, "R@5": 100.0, "R@10": 100.0, "MdR": 3.0, "MnR": 8 / 3})
    # Rsum = (50 + 100 + 100) + (100/3 + 100 + 100) = 483.33...
    assert out["Rsum"] == approx(250 + 100 / 3 + 200)
    assert out["Rsum"] == approx(sum(out[d][k] for d in ("t2v", "v2t") for k in ("R@1", "R@5", "R@10")))


def test_one_caption_per_video_is_the_usual_protocol():
    s = torch.tensor([[0.9, 0.2, 0.1], [0.8, 0.3, 0.1], [0.1, 0.2, 0.7]])
    out = retrieval_metrics(s, s.t(), torch.arange(3))
    # t2v rows: 0.9 best -> 1; 0.3 beaten by 0.8 -> 2; 0.7 best -> 1  => R@1 = 2/3, MnR = 4/3
    # v2t rows of s.t() (columns of s): v0 (0.9, 0.8, 0.1) gt 0.9 -> 1; v1 (0.2, 0.3, 0.2) gt 0.3 -> 1;
    #   v2 (0.1, 0.1, 0.7) gt 0.7 -> 1  => R@1 = 100
    assert out["t2v"]["MnR"] == approx(4 / 3) and out["t2v"]["R@1"] == approx(200 / 3)
    assert out["v2t"]["R@1"] == approx(100.0)
    assert out["Rsum"] == approx(200 / 3 + 100 + 100 + 300)


def test_ranks_rejects_bad_input():
    scores = torch.rand(3, 4)
    positive = torch.zeros(3, 4, dtype=torch.bool)
    positive[0, 0] = positive[2, 1] = True  # query 1 has no ground truth
    with pytest.raises(ValueError, match="at least one ground-truth"):
        ranks(scores, positive)
    with pytest.raises(ValueError, match="must match"):
        ranks(scores, torch.ones(3, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="must match"):
        ranks(scores, torch.ones(4, dtype=torch.bool))
    # a video with no caption in the multi-caption protocol is a ground-truth-less v2t query
    with pytest.raises(ValueError):
        retrieval_metrics(torch.rand(2, 3), torch.rand(3, 2), torch.tensor([0, 1]))


def test_nan_scores_are_refused():
    # A NaN never compares higher than anything, so a NaN ground-truth score would pass for rank 1.
    scores = torch.tensor([[float("nan"), 1.0, 2.0], [0.1, 0.9, 0.3]])
    with pytest.raises(ValueError, match="NaN"):
        ranks(scores, torch.eye(2, 3, dtype=torch.bool))
    # -inf (a masked-out candidate) is a legitimate score
    scores = torch.tensor([[0.5, float("-inf"), 2.0]])
    assert ranks(scores, torch.tensor([[True, False, False]])).tolist() == [2]
