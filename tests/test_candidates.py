"""Stage-two candidates when a batch repeats a video (docs/fidelity.md, "same-video negatives").

The original fills same-video entries of its in-batch weights with -1 and still takes the top
`num` = B - 1, so a batch that holds a video twice gives that video (even the query's own pair)
as a negative with label 0. diffret never does: a pair of the query's video is no negative, and K
shrinks to what the batch can give (`usable_candidates`).
"""
from __future__ import annotations

import torch

from diffret.generator import trainer
from diffret.generator.candidates import usable_candidates
from diffret.generator.features import SplitFeatures


def _features(g, video_of_caption: torch.Tensor, nv: int, L=4, F=3, D=8) -> SplitFeatures:
    nt = len(video_of_caption)
    words = torch.randn(nt, L, D, generator=g)
    return SplitFeatures([f"c{i}" for i in range(nt)], video_of_caption, words[:, 0].clone(), words.half(),
                         torch.ones(nt, L, dtype=torch.bool), torch.randn(nt, L, generator=g),
                         [f"v{i}" for i in range(nv)], torch.randn(nv, F, D, generator=g),
                         torch.ones(nv, F, dtype=torch.bool), torch.randn(nv, F, generator=g))


def test_a_repeated_video_is_never_a_negative():
    g = torch.Generator().manual_seed(3)
    cv = torch.tensor([0, 0, 1, 2, 2, 2, 3, 4])  # videos 0 and 2 repeat in the batch
    f = _features(g, cv, nv=5)
    rows = torch.arange(len(cv))
    k = usable_candidates(cv[rows], 8)
    assert k == 8 - 3 + 1  # captions of video 2 have only 5 pairs of other videos: K = 6, not 8
    vids, caps = trainer.batch_candidates(f, rows, k)
    assert vids.shape == caps.shape == (8, k)
    assert torch.equal(vids[:, 0], cv) and torch.equal(caps[:, 0], rows)  # the positive first
    for i in range(len(rows)):
        assert (vids[i, 1:] != cv[i]).all()  # t2v: no candidate video is the query's own
        assert (cv[caps[i, 1:]] != cv[i]).all()  # v2t: no candidate caption describes the query video
