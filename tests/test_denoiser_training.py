"""Training through the fast path equals training through the plain formula: from the same initial
weights and seed, the first 20 steps' losses agree (tiny sizes, in-batch negatives with repeated
videos in a batch, padded frames)."""
from __future__ import annotations

import pytest
import torch

from diffret.generator import trainer
from diffret.generator.config import GeneratorConfig
from diffret.generator.features import SplitFeatures
from diffret.generator.reference import reference_denoise_pairs
from diffret.generator.schedule import NoiseSchedule


def _features(videos=10, captions=3, F=4, L=5, D=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    frames = torch.randn(videos, F, D, generator=g)
    n = videos * captions
    words = (frames.repeat_interleave(captions, 0).mean(1, keepdim=True) + torch.randn(n, L, D, generator=g)).half()
    fmask = torch.arange(F)[None] < torch.randint(2, F + 1, (videos,), generator=g)[:, None]
    wmask = torch.arange(L)[None] < torch.randint(2, L + 1, (n,), generator=g)[:, None]
    return SplitFeatures([f"c{i}" for i in range(n)], torch.arange(videos).repeat_interleave(captions),
                         words[:, -1].float(), words, wmask, torch.randn(n, L, generator=g),
                         [f"v{i}" for i in range(videos)], frames, fmask, torch.randn(videos, F, generator=g))


def _losses(denoise_pairs, f, cfg, steps=20):
    torch.manual_seed(cfg.seed)
    t2v, v2t, params, opt, ema = trainer.build_models(f.width, cfg, "cpu", total_steps=steps)
    sched = NoiseSchedule(cfg.schedule_config())
    gen = torch.Generator().manual_seed(cfg.seed)
    n = len(f.caption_id)
    out = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(trainer, "denoise_pairs", denoise_pairs)
        for s in range(steps):
            rows = torch.randperm(n, generator=gen)[:cfg.batch_size]
            out.append(trainer.train_step(t2v, v2t, f, rows, sched, cfg, gen, opt, params, ema))
    return out, [p.detach().clone() for p in params]


@pytest.mark.parametrize("loss", ["ce", "mse"])
def test_twenty_steps_give_the_plain_formulas_losses(loss):
    f = _features()
    cfg = GeneratorConfig(batch_size=8, candidates=6, loss=loss, lr=1e-3)
    fast, w_fast = _losses(trainer.denoise_pairs, f, cfg)
    plain, w_plain = _losses(reference_denoise_pairs, f, cfg)
    assert len(fast) == 20 and None not in fast
    torch.testing.assert_close(torch.tensor(fast), torch.tensor(plain), rtol=1e-4, atol=1e-5)
    assert len(set(round(v, 6) for v in fast)) > 10  # the losses move: the weights do train
    # the weights too (Adam can amplify a near-zero gradient's rounding in one element, so as a whole)
    diff = torch.cat([(a - b).flatten() for a, b in zip(w_fast, w_plain)]).norm()
    assert diff <= 1e-3 * torch.cat([a.flatten() for a in w_plain]).norm()
