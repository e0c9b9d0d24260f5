"""`diffret import-checkpoint` on a synthetic state dict laid out like the released DiffusionRet
checkpoints (OpenAI CLIP names under `clip.`, CLIP4Clip's `transformerClip`, the two denoisers),
at the tiny config's shapes: every weight lands where it should, and the imported denoisers
compute the formulas of DESIGN.md written out by hand here."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import read_json, run_cli
from synthetic_cache import synthetic_cache

D = 64  # the tiny config's joint width


def _denoiser_weights(g) -> dict:
    r = lambda *s: 0.2 * torch.randn(*s, generator=g)  # noqa: E731
    pos = torch.arange(5000, dtype=torch.float32)[:, None]
    div = torch.exp(torch.arange(0, D, 2).float() * (-math.log(10000.0) / D))
    pe = torch.zeros(5000, D)
    pe[:, 0::2], pe[:, 1::2] = torch.sin(pos * div), torch.cos(pos * div)
    return {"q_proj.weight": r(D, D), "k_proj.weight": r(D, D), "v_proj.weight": r(D, D), "proj.weight": r(D, D),
            "proj.bias": r(D), "sequence_pos_encoder.pe": pe[:, None], "embed_timestep.sequence_pos_encoder.pe": pe[:, None],
            "embed_timestep.time_embed.0.weight": r(D, D), "embed_timestep.time_embed.0.bias": r(D),
            "embed_timestep.time_embed.2.weight": r(D, D), "embed_timestep.time_embed.2.bias": r(D),
            "decoder.0.weight": r(2 * D, 2 * D), "decoder.0.bias": r(2 * D), "decoder.2.weight": r(1, 2 * D),
            "decoder.2.bias": r(1)}


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    """A state dict with the released checkpoint's key names, random values, tiny shapes."""
    import open_clip

    import diffret.extract.backbone  # noqa: F401  (registers the tiny config)

    g = torch.Generator().manual_seed(0)
    clip = open_clip.create_model("tiny", pretrained=None).state_dict()
    sd = {f"clip.{k}": torch.randn(v.shape, generator=g) for k, v in clip.items()}
    sd["clip.input_resolution"] = torch.tensor(32)  # OpenAI JIT metadata, to be ignored
    for k, v in clip.items():
        if k.startswith("transformer.resblocks.") and int(k.split(".")[2]) < 4:
            sd["transformerClip." + k[len("transformer."):]] = torch.randn(v.shape, generator=g)
    sd["frame_position_embeddings.weight"] = torch.randn(32, D, generator=g)
    for head in ("text_weight_fc", "video_weight_fc"):
        sd.update({f"{head}.0.weight": torch.randn(2 * D, D, generator=g), f"{head}.0.bias": torch.randn(2 * D, generator=g),
                   f"{head}.2.weight": torch.randn(1, 2 * D, generator=g), f"{head}.2.bias": torch.randn(1, generator=g)})
    for prefix in ("diffusion_model", "diffusion_model_v"):
        sd.update({f"{prefix}.{k}": v for k, v in _denoiser_weights(g).items()})
    sd["loss_fct.dummy"] = torch.zeros(1)  # anything else is reported and ignored
    path = tmp_path_factory.mktemp("orig") / "pytorch_model.bin.4"
    torch.save(sd, path)
    return path, sd


def _by_hand(w: dict, x_t, t, query, cand, mask, direction: str):
    """DESIGN.md's denoiser, from the original's raw weights."""
    lin = lambda x, k, bias=True: x @ w[f"{k}.weight"].T + (w[f"{k}.bias"] if bias else 0)  # noqa: E731
    i = torch.arange(0, D, 2).float()
    pe = torch.zeros(len(t), D)
    pe[:, 0::2] = torch.sin(t[:, None] * torch.exp(-i * math.log(10000.0) / D))
    pe[:, 1::2] = torch.cos(t[:, None] * torch.exp(-i * math.log(10000.0) / D))
    c = lin(F.silu(lin(pe, "embed_timestep.time_embed.0")), "embed_timestep.time_embed.2")  # [B, D]
    if direction == "t2v":  # query text [B, D]; candidate videos' frames [B, K, F, D]
        a = torch.softmax(torch.einsum("bd,bkfd->bkf", query, cand), -1) * mask
        items = torch.einsum("bkf,bkfd->bkd", a, cand)  # v_k
        q = lin(query + c, "q_proj", False)[:, None]  # [B, 1, D]
        keys = lin(items + c[:, None], "k_proj", False)
        vals = lin(items + c[:, None], "v_proj", False)
    else:  # query video's frames [B, F, D]; candidate texts [B, K, D]
        a = torch.softmax(torch.einsum("bkd,bfd->bkf", cand, query), -1) * mask[:, None]
        u = torch.einsum("bkf,bfd->bkd", a, query)
        q = lin(u + c[:, None], "q_proj", False)
        items = cand
        keys = lin(cand + c[:, None], "k_proj", False)
        vals = lin(cand + c[:, None], "v_proj", False)
    wts = torch.softmax((q * keys).sum(-1) + x_t, -1)  # no 1/sqrt(D)
    e = lin((wts[..., None] * vals).sum(1), "proj")
    h = torch.relu(lin(torch.cat([e[:, None].expand_as(items), items], -1), "decoder.0"))
    return lin(h, "decoder.2").squeeze(-1) + wts


@pytest.mark.slow
def test_import_maps_every_weight(original, tmp_path):
    from diffret.extract.checkpoint import load_stage1
    from diffret.generator.checkpoint import load_generator

    path, sd = original
    out = tmp_path / "imported"
    r = run_cli("import-checkpoint", path, "--out", out, "--model", "tiny")
    assert "ignored 2 keys" in r.output
    net, _, fp, cfg = load_stage1(out / "stage1.pt")  # what `extract --stage1` loads (checks the fingerprint)
    assert (cfg["model"], cfg["pretrained"], cfg["frames"], cfg["temporal_layers"]) == ("tiny", "none", 12, 4)
    # the released checkpoints fine-tune OpenAI's CLIP: QuickGELU everywhere, whatever --model names
    from diffret.extract.backbone import activation_of

    assert activation_of(net) == "quick_gelu" and torch.load(out / "stage1.pt", weights_only=False)["activation"] == "quick_gelu"
    assert (cfg["wti_padding"], cfg["frame_padding"]) == ("zero", "zero-frame")  # the original's rules
    ours = net.state_dict()
    assert torch.equal(ours["clip.visual.conv1.weight"], sd["clip.visual.conv1.weight"])
    assert torch.equal(ours["clip.transformer.resblocks.1.mlp.c_fc.weight"], sd["clip.transformer.resblocks.1.mlp.c_fc.weight"])
    assert torch.equal(ours["temporal.blocks.3.attn.in_proj_weight"], sd["transformerClip.resblocks.3.attn.in_proj_weight"])
    assert torch.equal(ours["temporal.blocks.0.ln_2.bias"], sd["transformerClip.resblocks.0.ln_2.bias"])
    assert torch.equal(ours["temporal.frame_position_embeddings.weight"], sd["frame_position_embeddings.weight"][:12])
    assert torch.equal(ours["video_weight_fc.2.weight"], sd["video_weight_fc.2.weight"])

    gen = load_generator(out / "generator")
    t2v, v2t, meta = gen.t2v, gen.v2t, gen.meta
    assert meta["width"] == D and meta["cache"]["fingerprint"] == fp and gen.config.train_steps == 50
    g = torch.Generator().manual_seed(1)
    B, K, Fn = 3, 5, 4
    mask = (torch.rand(B, K, Fn, generator=g) > 0.3).float()
    mask[..., 0] = 1
    x_t, t = torch.randn(B, K, generator=g), torch.tensor([0, 17, 49])
    text, frames = torch.randn(B, D, generator=g), torch.randn(B, K, Fn, D, generator=g)
    w = {k[len("diffusion_model."):]: v for k, v in sd.items() if k.startswith("diffusion_model.")}
    with torch.no_grad():
        assert torch.allclose(t2v(x_t, t, text, frames, mask), _by_hand(w, x_t, t.float(), text, frames, mask, "t2v"),
                              atol=1e-4)
        texts, vframes = torch.randn(B, K, D, generator=g), torch.randn(B, Fn, D, generator=g)
        w = {k[len("diffusion_model_v."):]: v for k, v in sd.items() if k.startswith("diffusion_model_v.")}
        assert torch.allclose(v2t(x_t, t, texts, vframes, mask[:, 0]),
                              _by_hand(w, x_t, t.float(), vframes, texts, mask[:, 0], "v2t"), atol=1e-4)

    # a cache dumped with the imported stage 1 carries its fingerprint: evaluation needs no extra flag
    cache = synthetic_cache(tmp_path / "cache", width=D, n_train=6, n_test=5, fingerprint=fp)
    run_cli("evaluate", "--cache", cache, "--generator", out / "generator", "--steps", 5, "--top-k", 3,
            "--json", tmp_path / "m.json")
    assert set(read_json(tmp_path / "m.json")["results"]) == {"discriminative", "diffusion"}


@pytest.mark.slow
def test_bad_checkpoints_are_one_line(original, tmp_path):
    path, sd = original
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    broken = tmp_path / "broken.pth"
    torch.save({k: v for k, v in sd.items() if k != "diffusion_model_v.decoder.0.bias"}, broken)
    wrong = tmp_path / "wrong.pth"
    torch.save({k: v for k, v in sd.items() if not k.startswith("diffusion")}, wrong)
    for file, args, words in ((junk, [], "cannot read"), (broken, ["--model", "tiny"], "diffusion_model_v.decoder.0.bias"),
                              (wrong, ["--model", "ViT-B-32-quickgelu"], "do not fit"),
                              (tmp_path / "missing.pth", [], "does not exist")):
        r = run_cli("import-checkpoint", file, "--out", tmp_path / "o", *args, ok=False)
        assert r.exit_code == 1 and words in r.output and r.output.strip().count("\n") == 0, r.output
