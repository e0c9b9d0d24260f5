"""Issue 10's done-criterion: a state dict with the original DiffusionRet's key names, imported with
`diffret import-checkpoint` and sampled through `diffret evaluate` (50 DDIM steps, top-32, alpha 1,
temp 1), gives the scores of the original's formulas to 1e-5, for both denoisers, on a trajectory
whose x0 predictions leave [-1, 1].

The reference is re-stated here in plain torch from the original code (not imported from it):
`Diffusion` / `Diffusion_v` forward (DiffusionRet/models/diffusion.py), guided-diffusion's
`ddim_sample_loop` with `clip_denoised=True`, eta 0 (diffusion_models/gaussian_diffusion.py, its
`p_mean_variance` clamping `pred_xstart`, `_predict_eps_from_xstart` from the clamped value), the
cosine schedule of `betas_for_alpha_bar`, and `_run_on_single_gpu`'s re-scoring (main_retrieval.py:
top-32 of S by row, S[i, j] += softmax(sample * temp)[i, _i] * alpha)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from conftest import run_cli
from synthetic_cache import synthetic_cache

from diffret.cache.store import CacheReader
from diffret.generator.features import load_split
from diffret.generator.rerank import chunk_size

D, FRAMES, T, K = 32, 4, 50, 32
N_TEST = 40  # one caption a video; more than K, so the top-K choice matters


def _pe(max_len: int = 5000) -> torch.Tensor:
    """The original's PositionalEncoding buffer [max_len, 1, D]."""
    pe = torch.zeros(max_len, D)
    position = torch.arange(0, max_len, dtype=torch.float).unsqueeze(1)
    div_term = torch.exp(torch.arange(0, D, 2).float() * (-np.log(10000.0) / D))
    pe[:, 0::2] = torch.sin(position * div_term)
    pe[:, 1::2] = torch.cos(position * div_term)
    return pe.unsqueeze(0).transpose(0, 1)


def _weights(g) -> dict:
    """One denoiser's weights, scaled so the attention logits stay O(1) and x0_hat reaches about +-3."""
    r = lambda std, *shape: std * torch.randn(*shape, generator=g)  # noqa: E731
    pe = _pe()
    return {"q_proj.weight": r(0.05, D, D), "k_proj.weight": r(0.05, D, D), "v_proj.weight": r(0.1, D, D),
            "proj.weight": r(0.1, D, D), "proj.bias": r(0.1, D),
            "sequence_pos_encoder.pe": pe, "embed_timestep.sequence_pos_encoder.pe": pe.clone(),
            "embed_timestep.time_embed.0.weight": r(0.2, D, D), "embed_timestep.time_embed.0.bias": r(0.1, D),
            "embed_timestep.time_embed.2.weight": r(0.2, D, D), "embed_timestep.time_embed.2.bias": r(0.1, D),
            "decoder.0.weight": r(0.1, 2 * D, 2 * D), "decoder.0.bias": r(0.1, 2 * D),
            "decoder.2.weight": r(0.4, 1, 2 * D), "decoder.2.bias": r(0.3, 1)}


def _lin(w, name, x, bias=True):
    return x @ w[f"{name}.weight"].T + (w[f"{name}.bias"] if bias else 0)


def _cond(w, timesteps):
    """TimestepEmbedder: time_embed(pe[timesteps]) [B, 1, D], squeezed to [B, D] by the caller."""
    h = _lin(w, "embed_timestep.time_embed.0", w["embed_timestep.sequence_pos_encoder.pe"][timesteps])
    return _lin(w, "embed_timestep.time_embed.2", torch.nn.functional.silu(h))


def diffusion_forward(w, x, timesteps, text_emb, video_emb, video_mask, temp=1.0):
    """Diffusion.forward: x [b, a], text_emb [b, D], video_emb [b, a, v, D], video_mask [b, a, v]."""
    cond_emb = _cond(w, timesteps).squeeze(1)
    v_weight = torch.softmax(torch.einsum("ad,abvd->abv", text_emb, video_emb) / temp, dim=-1)
    v_weight = torch.einsum("abv,abv->abv", v_weight, video_mask)
    video_emb = torch.einsum("abv,abvd->abd", v_weight, video_emb)
    q = _lin(w, "q_proj", text_emb + cond_emb, bias=False)
    k = _lin(w, "k_proj", video_emb + cond_emb.unsqueeze(1), bias=False)
    v = _lin(w, "v_proj", video_emb + cond_emb.unsqueeze(1), bias=False)
    weight = torch.softmax(torch.einsum("bd,bvd->bv", q, k) + x, dim=-1)
    new_emb = _lin(w, "proj", torch.einsum("bv,bvd->bd", weight, v))
    emb = torch.cat([new_emb.unsqueeze(1).repeat(1, video_emb.size(1), 1), video_emb], dim=-1)
    p = _lin(w, "decoder.2", torch.relu(_lin(w, "decoder.0", emb))).squeeze(2)
    return p + weight


def diffusion_v_forward(w, x, timesteps, text_emb, video_emb, video_mask, temp=1.0):
    """Diffusion_v.forward: x [b, a], text_emb [b, a, D], video_emb [b, v, D], video_mask [b, v]."""
    cond_emb = _cond(w, timesteps).squeeze(1)
    v_weight = torch.softmax(torch.einsum("bad,bvd->bav", text_emb, video_emb) / temp, dim=-1)
    v_weight = torch.einsum("bav,bv->bav", v_weight, video_mask)
    video_emb = torch.einsum("bav,bvd->bad", v_weight, video_emb)
    q = _lin(w, "q_proj", video_emb + cond_emb.unsqueeze(1), bias=False)
    k = _lin(w, "k_proj", text_emb + cond_emb.unsqueeze(1), bias=False)
    v = _lin(w, "v_proj", text_emb + cond_emb.unsqueeze(1), bias=False)
    weight = torch.softmax(torch.einsum("bad,bad->ba", q, k) + x, dim=-1)
    new_emb = _lin(w, "proj", torch.einsum("ba,bad->bd", weight, v))
    emb = torch.cat([new_emb.unsqueeze(1).repeat(1, text_emb.size(1), 1), text_emb], dim=-1)
    p = _lin(w, "decoder.2", torch.relu(_lin(w, "decoder.0", emb))).squeeze(2)
    return p + weight


def _cosine_schedule():
    """betas_for_alpha_bar(T, cos((t + 0.008) / 1.008 pi / 2)^2, 0.999), float64 as the original."""
    ab = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    betas = np.array([min(1 - ab((i + 1) / T) / ab(i / T), 0.999) for i in range(T)], dtype=np.float64)
    acp = np.cumprod(1.0 - betas)
    return acp, np.append(1.0, acp[:-1])


def ddim_sample_loop(model, noise, clamp_log):
    """guided-diffusion's ddim_sample_loop(model, shape, noise, clip_denoised=True, eta=0.0) -> the last
    "sample". Coefficients are float64 arrays read at t as float32 (`_extract_into_tensor`)."""
    acp, acp_prev = _cosine_schedule()
    ext = lambda arr, i: torch.from_numpy(arr)[i].float()  # noqa: E731
    img = noise
    for i in list(range(T))[::-1]:
        t = torch.tensor([i] * noise.shape[0])
        model_output = model(img, t)
        clamp_log.append(model_output.abs().max().item())
        pred_xstart = model_output.clamp(-1, 1)  # p_mean_variance, clip_denoised
        eps = (ext(np.sqrt(1.0 / acp), i) * img - pred_xstart) / ext(np.sqrt(1.0 / acp - 1), i)
        alpha_bar_prev = ext(acp_prev, i)
        alpha_bar = ext(acp, i)
        sigma = 0.0 * torch.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar)) * torch.sqrt(1 - alpha_bar / alpha_bar_prev)
        img = pred_xstart * torch.sqrt(alpha_bar_prev) + torch.sqrt(1 - alpha_bar_prev - sigma ** 2) * eps
    return img


def original_rerank(S, forward, w, noise, candidates_of, clamp_log, num=K, alpha=1.0, temp=1.0):
    """_run_on_single_gpu's re-scoring of one direction: S [Nq, Nc] -> S'."""
    out = S.clone()
    ids = S.topk(num, dim=1, largest=True, sorted=True).indices
    sample = ddim_sample_loop(lambda x, t: forward(w, x, t, *candidates_of(ids)), noise, clamp_log)
    sample = torch.softmax(sample * temp, dim=-1)
    for i in range(len(S)):
        for _i, j in enumerate(ids[i]):
            out[i, j] += sample[i, _i] * alpha
    return out


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    root = tmp_path_factory.mktemp("equiv")
    g = torch.Generator().manual_seed(0)
    sd = {f"diffusion_model.{k}": v for k, v in _weights(g).items()}
    sd.update({f"diffusion_model_v.{k}": v for k, v in _weights(g).items()})
    torch.save(sd, root / "pytorch_model.bin")
    run_cli("import-checkpoint", root / "pytorch_model.bin", "--out", root / "imported")
    cache = synthetic_cache(root / "cache", n_train=6, n_test=N_TEST, width=D, frames=FRAMES, words=6)
    return root, sd, cache


def _evaluate(root, cache, name, *extra):
    sims = root / f"{name}.npz"
    run_cli("evaluate", "--cache", cache, "--generator", root / "imported" / "generator", "--device", "cpu",
            "--save-sims", sims, *extra)
    return np.load(sims)


@pytest.mark.slow
def test_imported_checkpoint_samples_as_the_original(imported):
    root, sd, cache = imported
    sims = _evaluate(root, cache, "default")  # every sampling setting at its default
    f = load_split(CacheReader(cache), "test")
    text, frames, fmask = f.sentence.float(), f.frames.float(), f.frame_mask.float()
    S = torch.from_numpy(sims["discriminative_t2v"])
    assert S.shape == (N_TEST, N_TEST) and torch.equal(torch.from_numpy(sims["discriminative_v2t"]), S.t())
    # x_T as `evaluate` draws it: seed 0, one randn((n, K)) per chunk of queries (here one chunk)
    assert chunk_size(K, D, FRAMES) >= N_TEST
    noise = torch.randn((N_TEST, K), generator=torch.Generator().manual_seed(0))
    w_t = {k[len("diffusion_model."):]: v for k, v in sd.items() if k.startswith("diffusion_model.")}
    w_v = {k[len("diffusion_model_v."):]: v for k, v in sd.items() if k.startswith("diffusion_model_v.")}
    peaks = {"t2v": [], "v2t": []}
    ref_t2v = original_rerank(S, diffusion_forward, w_t, noise, lambda ids: (text, frames[ids], fmask[ids]),
                              peaks["t2v"])
    ref_v2t = original_rerank(S.t().contiguous(), diffusion_v_forward, w_v, noise,
                              lambda ids: (text[ids], frames, fmask), peaks["v2t"])
    for d in ("t2v", "v2t"):  # x0 leaves [-1, 1] all along the 50 steps: the clamp and its epsilon matter
        assert len(peaks[d]) == T and min(peaks[d]) > 1.2 and max(peaks[d]) > 2.0, (d, min(peaks[d]), max(peaks[d]))
    ours_t2v, ours_v2t = torch.from_numpy(sims["diffusion_t2v"]), torch.from_numpy(sims["diffusion_v2t"])
    torch.testing.assert_close(ours_t2v, ref_t2v, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours_v2t, ref_v2t, atol=1e-5, rtol=0)
    assert (ours_t2v != S).sum(1).tolist() == [K] * N_TEST  # every query's top 32 moved, nothing else

    # the test can tell: diffusers' epsilon (from the raw x0) lands elsewhere
    raw = _evaluate(root, cache, "raw", "--ddim-eps", "raw")
    for d, ref in (("t2v", ref_t2v), ("v2t", ref_v2t)):
        assert (torch.from_numpy(raw[f"diffusion_{d}"]) - ref).abs().max() > 1e-3, d
