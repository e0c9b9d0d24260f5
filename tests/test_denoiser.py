import math

import pytest
import torch
import torch.nn.functional as F

from diffret.generator.denoiser import T2VDenoiser, V2TDenoiser, count_parameters
from diffret.generator.losses import generation_loss, one_hot_x0

DENOISERS = [T2VDenoiser, V2TDenoiser]
EXPECTED_KEYS = {
    "q_proj.weight", "k_proj.weight", "v_proj.weight", "proj.weight", "proj.bias",
    "sequence_pos_encoder.pe", "embed_timestep.sequence_pos_encoder.pe",
    "embed_timestep.time_embed.0.weight", "embed_timestep.time_embed.0.bias",
    "embed_timestep.time_embed.2.weight", "embed_timestep.time_embed.2.bias",
    "decoder.0.weight", "decoder.0.bias", "decoder.2.weight", "decoder.2.bias",
}


def _fixed_weights(model):
    """Deterministic, distinct, moderate weights (no RNG)."""
    with torch.no_grad():
        for i, (_, p) in enumerate(sorted(model.named_parameters())):
            n = torch.arange(p.numel(), dtype=torch.float32)
            p.copy_((0.5 * torch.sin(1.7 * n + 0.9 * i + 0.3)).view_as(p))
    return model


def _inputs(direction, B, K, F_, D, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    x_t = torch.randn(B, K, generator=g)
    if direction is T2VDenoiser:
        query = scale * torch.randn(B, D, generator=g)
        frames = scale * torch.randn(B, K, F_, D, generator=g)
        mask = (torch.rand(B, K, F_, generator=g) > 0.3).float()
        mask[..., 0] = 1.0
    else:
        query = scale * torch.randn(B, K, D, generator=g)
        frames = scale * torch.randn(B, F_, D, generator=g)
        mask = (torch.rand(B, F_, generator=g) > 0.3).float()
        mask[..., 0] = 1.0
    return x_t, query, frames, mask


@pytest.mark.parametrize("cls", DENOISERS)
def test_parameter_count_and_keys(cls):
    D = 512
    m = cls(D)
    assert count_parameters(m) == 10 * D * D + 7 * D + 1 == 2_625_025
    assert set(m.state_dict()) == EXPECTED_KEYS
    pe = m.sequence_pos_encoder.pe
    assert pe.shape == (5000, 1, D) and "pe" not in dict(m.named_parameters())
    pos, i = 37, 10
    div = math.exp(i * (-math.log(10000.0) / D))
    assert pe[pos, 0, i].item() == pytest.approx(math.sin(pos * div), abs=1e-5)
    assert pe[pos, 0, i + 1].item() == pytest.approx(math.cos(pos * div), abs=1e-5)
    # a state dict round-trips strictly (both copies of the shared table load)
    cls(D).load_state_dict(m.state_dict(), strict=True)


def _c(m, t):
    pe = m.sequence_pos_encoder.pe[t, 0]  # [B, D]
    l1, l2 = m.embed_timestep.time_embed[0], m.embed_timestep.time_embed[2]
    h = pe @ l1.weight.T + l1.bias
    return (h * torch.sigmoid(h)) @ l2.weight.T + l2.bias


def _decoder(m, e, cand, w):
    l1, l2 = m.decoder[0], m.decoder[2]
    x = torch.cat([e.unsqueeze(1).expand(-1, cand.shape[1], -1), cand], -1)
    return (torch.relu(x @ l1.weight.T + l1.bias) @ l2.weight.T + l2.bias)[..., 0] + w


def hand_t2v(m, x_t, t, text, frames, mask):
    c = _c(m, t)
    a = torch.softmax(torch.einsum("bd,bkfd->bkf", text, frames), -1) * mask
    v = torch.einsum("bkf,bkfd->bkd", a, frames)
    Wq, Wk, Wv = m.q_proj.weight, m.k_proj.weight, m.v_proj.weight
    q = torch.einsum("ed,bd->be", Wq, text + c)
    k = torch.einsum("ed,bkd->bke", Wk, v + c[:, None])
    val = torch.einsum("ed,bkd->bke", Wv, v + c[:, None])
    w = torch.softmax(torch.einsum("bd,bkd->bk", q, k) + x_t, -1)
    e = torch.einsum("bk,bkd->bd", w, val) @ m.proj.weight.T + m.proj.bias
    return _decoder(m, e, v, w)


def hand_v2t(m, x_t, t, texts, frames, mask):
    c = _c(m, t)
    a = torch.softmax(torch.einsum("bkd,bfd->bkf", texts, frames), -1) * mask[:, None]
    u = torch.einsum("bkf,bfd->bkd", a, frames)
    Wq, Wk, Wv = m.q_proj.weight, m.k_proj.weight, m.v_proj.weight
    q = torch.einsum("ed,bkd->bke", Wq, u + c[:, None])
    k = torch.einsum("ed,bkd->bke", Wk, texts + c[:, None])
    val = torch.einsum("ed,bkd->bke", Wv, texts + c[:, None])
    w = torch.softmax(torch.einsum("bkd,bkd->bk", q, k) + x_t, -1)
    e = torch.einsum("bk,bkd->bd", w, val) @ m.proj.weight.T + m.proj.bias
    return _decoder(m, e, texts, w)


@pytest.mark.parametrize("cls,hand", [(T2VDenoiser, hand_t2v), (V2TDenoiser, hand_v2t)])
def test_small_example_by_hand(cls, hand):
    B, K, F_, D = 2, 3, 2, 4
    m = _fixed_weights(cls(D)).eval()
    x_t, query, frames, mask = _inputs(cls, B, K, F_, D, seed=3)
    t = torch.tensor([7, 0])
    expected = hand(m, x_t, t, query, frames, mask)
    assert expected.shape == (B, K)
    torch.testing.assert_close(m(x_t, t, query, frames, mask), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(m.reference_forward(x_t, t, query, frames, mask), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cls", DENOISERS)
def test_prepare_denoise_matches_reference(cls):
    B, K, F_, D = 3, 6, 5, 64
    torch.manual_seed(0)
    m = cls(D).eval()
    x_t, query, frames, mask = _inputs(cls, B, K, F_, D, seed=1, scale=D ** -0.5 * 3)
    ctx = m.prepare(query, frames, mask)
    for t in (torch.tensor([49, 3, 0]), 17, torch.full((1,), 25).expand(B), torch.tensor(8)):
        ref = m.reference_forward(x_t, t, query, frames, mask)
        torch.testing.assert_close(m.denoise(x_t, t, ctx), ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(m(x_t, t, query, frames, mask), ref, atol=1e-5, rtol=1e-5)
    # a shared t given as int, stride-0 tensor or full tensor is the same thing
    torch.testing.assert_close(m.denoise(x_t, 11, ctx), m.denoise(x_t, torch.full((B,), 11), ctx), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("cls", DENOISERS)
def test_gradients_match_reference(cls):
    B, K, F_, D = 2, 4, 3, 16
    torch.manual_seed(0)
    m = cls(D)
    x_t, query, frames, mask = _inputs(cls, B, K, F_, D, seed=2, scale=0.5)
    t = torch.tensor([5, 40])
    grads = []
    for fn in (m.forward, m.reference_forward):
        m.zero_grad()
        generation_loss(fn(x_t, t, query, frames, mask), kind="ce", temp=3.0).backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters()})
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], atol=1e-5, rtol=1e-4, msg=n)


def _orthogonal_noise(queries, shape, g):
    """Random [..., D] vectors orthogonal to every query vector of the same batch row."""
    noise = torch.randn(shape, generator=g)
    Q = queries.reshape(queries.shape[0], -1, queries.shape[-1])  # [B, Qn, D]
    basis = torch.linalg.qr(Q.transpose(1, 2)).Q  # [B, D, Qn]
    flat = noise.reshape(shape[0], -1, shape[-1])
    flat = flat - (flat @ basis) @ basis.transpose(1, 2)
    return flat.reshape(shape)


@pytest.mark.parametrize("cls", DENOISERS)
def test_masked_frames(cls):
    """Masked frames never enter the pooled features; like the original, the frame softmax
    is not renormalised, so they only act through its denominator (their score q . f)."""
    B, K, F_, D = 2, 3, 4, 8
    torch.manual_seed(0)
    m = cls(D).eval()
    x_t, query, frames, mask = _inputs(cls, B, K, F_, D, seed=4, scale=0.5)
    mask = torch.ones_like(mask)
    mask[..., -1] = 0.0
    mask[..., 1] = 0.0
    t = torch.tensor([3, 30])
    base = m(x_t, t, query, frames, mask)
    g = torch.Generator().manual_seed(7)
    moved = frames.clone()
    noise = _orthogonal_noise(query, frames.shape, g)
    moved[..., [1, F_ - 1], :] += 5.0 * noise[..., [1, F_ - 1], :]  # same scores, new content
    torch.testing.assert_close(m(x_t, t, query, moved, mask), base, atol=1e-5, rtol=1e-5)
    # the no-renormalisation quirk: changing a padded frame's *score* does change the output
    shifted = frames.clone()
    shifted[..., -1, :] += 2.0 * (query.mean(1) if cls is V2TDenoiser else query[:, None, :])
    assert not torch.allclose(m(x_t, t, query, shifted, mask), base, atol=1e-4)
    # valid frames do matter
    changed = frames.clone()
    changed[..., 0, :] += 1.0
    assert not torch.allclose(m(x_t, t, query, changed, mask), base, atol=1e-4)


def test_one_hot_x0():
    x = one_hot_x0(5, 3)
    assert x.shape == (3, 5) and x.dtype == torch.float32
    assert torch.equal(x[:, 0], torch.ones(3)) and torch.equal(x[:, 1:], torch.zeros(3, 4))
    p = one_hot_x0(4, 2, variant="pm1")
    assert torch.equal(p, torch.tensor([[1.0, -1, -1, -1]] * 2))
    with pytest.raises(ValueError):
        one_hot_x0(4, 2, variant="zeros")


def test_generation_losses():
    g = torch.Generator().manual_seed(0)
    x0_hat = torch.randn(4, 6, generator=g) * 0.05
    zeros = torch.zeros(4, dtype=torch.long)
    ce = generation_loss(x0_hat, zeros, kind="ce")
    torch.testing.assert_close(ce, F.cross_entropy(x0_hat * 100, zeros))
    torch.testing.assert_close(generation_loss(x0_hat), ce)  # defaults: ce, positive at 0
    idx = torch.tensor([0, 2, 5, 1])
    torch.testing.assert_close(generation_loss(x0_hat, idx), F.cross_entropy(x0_hat * 100, idx))
    x0 = one_hot_x0(6, 4, variant="pm1")
    torch.testing.assert_close(generation_loss(x0_hat, zeros, kind="mse", x0=x0), ((x0_hat - x0) ** 2).mean())
    torch.testing.assert_close(generation_loss(x0_hat, kind="mse"), ((x0_hat - one_hot_x0(6, 4)) ** 2).mean())
    # kl with no smoothing is ce; with smoothing it is KL to the smoothed target
    torch.testing.assert_close(generation_loss(x0_hat, zeros, kind="kl", label_smoothing=0.0), ce)
    p = one_hot_x0(6, 4) * 0.9 + 0.1 / 6
    logq = F.log_softmax(x0_hat * 100, -1)
    kl = (p * (p.log() - logq)).sum(-1).mean()
    torch.testing.assert_close(generation_loss(x0_hat, zeros, kind="kl"), kl)
    with pytest.raises(ValueError):
        generation_loss(x0_hat, zeros, kind="hinge")


def test_fused_head_is_kept_until_a_weight_changes():
    from diffret.generator.denoiser import T2VDenoiser

    m = T2VDenoiser(8)
    with torch.no_grad():
        first = m._head()
        assert m._head() is first  # sampling reuses it
        m.proj.weight.add_(1.0)  # an in-place update (optimizer step, EMA, load_state_dict)
        changed = m._head()
    assert changed is not first
    assert torch.allclose(changed[0], m._compute_head()[0])
    assert m._head()[0].requires_grad  # with gradients it is always recomputed
