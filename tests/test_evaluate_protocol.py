"""Evaluation beyond the spine: multi-caption protocol, whole-gallery generation, DSL and QB-Norm
rows, saved score matrices that reproduce the metrics, and the generator/cache compatibility checks
(out of domain: same stage-1 model, other data)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import read_json, run_cli
from synthetic_cache import synthetic_cache

from diffret.generator.denoiser import T2VDenoiser, V2TDenoiser
from diffret.pipeline.evaluate import ground_truth, protocol_metrics
from diffret.pipeline.metrics import ranks, recall_metrics
from diffret.pipeline.revisers import dual_softmax

FP = "synthetic0000000"


@pytest.fixture(scope="module")
def multi(tmp_path_factory):
    """Train cache + generator, and a multi-caption test split (3 captions a video, one video without)."""
    root = tmp_path_factory.mktemp("multi")
    cache = synthetic_cache(root / "cache", n_train=12, n_test=7, test_caps=3, uncaptioned_test=1)
    gen = root / "gen"
    run_cli("train-generator", "--cache", cache, "--out", gen, "--epochs", 1, "--batch-size", 8, "--candidates", 4,
            "--steps", 10, "--lr", "1e-3")
    return cache, gen


def test_multi_caption_protocol_by_hand():
    # 3 videos; captions 0, 1 -> video 0, caption 2 -> video 1; video 2 has no caption.
    cv = torch.tensor([0, 0, 1])
    t2v = torch.tensor([[0.9, 0.1, 0.5], [0.2, 0.8, 0.1], [0.3, 0.4, 0.9]])  # ranks 1, 2, 2
    v2t = torch.tensor([[0.1, 0.7, 0.9], [0.5, 0.1, 0.2], [0.9, 0.9, 0.9]])  # v0: best of c0 (3), c1 (2) -> 2; v1: c2 -> 2
    m = protocol_metrics(t2v, v2t, cv)
    assert m["t2v"]["MnR"] == pytest.approx(5 / 3) and m["t2v"]["R@1"] == pytest.approx(100 / 3)
    assert m["v2t"]["MnR"] == 2.0 and m["v2t"]["R@1"] == 0.0  # video 2 is no v2t query
    t2v_gt, v2t_gt = ground_truth(cv, 3)
    assert t2v_gt.tolist() == [0, 0, 1] and v2t_gt.tolist() == [[0, 1], [2, -1], [-1, -1]]
    assert ground_truth(torch.tensor([1, 0]), 2)[1].tolist() == [1, 0]  # one caption each: [Nv]


def test_all_rows_saved_sims_reproduce_the_metrics(multi, tmp_path):
    cache, gen = multi
    out, sims = tmp_path / "m.json", tmp_path / "s.npz"
    r = run_cli("evaluate", "--cache", cache, "--generator", gen, "--top-k", "all", "--steps", 5, "--dsl",
                "--qb-norm", "--qb-k", 2, "--save-sims", sims, "--json", out)
    for row in ("discriminative", "diffusion", "dsl", "qbnorm"):
        assert row in r.output
    report = read_json(out)
    assert report["top_k"] == "all" and report["steps"] == 5 and report["n_queries"] == 18
    assert report["qbnorm"]["bank"] == {"t2v": 24, "v2t": 12} and report["dsl"]["on"] == "discriminative"
    z = np.load(sims)
    assert z["t2v_gt"].shape == (18,) and z["v2t_gt"].shape == (7, 3) and (z["v2t_gt"][6] == -1).all()
    for row, metrics in report["results"].items():
        t2v, v2t = torch.from_numpy(z[f"{row}_t2v"]), torch.from_numpy(z[f"{row}_v2t"])
        assert t2v.shape == (18, 7) and v2t.shape == (7, 18)
        # recompute from the file alone: t2v by t2v_gt, v2t by the rows of v2t_gt (-1 = padding)
        pos = torch.zeros(18, 7, dtype=torch.bool)
        pos[torch.arange(18), torch.from_numpy(z["t2v_gt"])] = True
        assert recall_metrics(ranks(t2v, pos)) == pytest.approx(metrics["t2v"])
        vpos = torch.zeros(7, 18, dtype=torch.bool)
        for v, cols in enumerate(torch.from_numpy(z["v2t_gt"])):
            vpos[v, cols[cols >= 0]] = True
        keep = vpos.any(1)  # a video without captions is no v2t query
        assert recall_metrics(ranks(v2t[keep], vpos[keep])) == pytest.approx(metrics["v2t"])
    S = torch.from_numpy(z["discriminative_t2v"])
    assert torch.allclose(torch.from_numpy(z["dsl_t2v"]), dual_softmax(S, 1.0, 100.0), rtol=1e-5)
    # whole-gallery generation changes every entry; top-2 re-ranking leaves the rest of each row as it was
    assert (torch.from_numpy(z["diffusion_t2v"]) != S).all()
    run_cli("evaluate", "--cache", cache, "--generator", gen, "--top-k", 2, "--steps", 5, "--save-sims", sims)
    changed = torch.from_numpy(np.load(sims)["diffusion_t2v"]) != S
    assert (changed.sum(1) == 2).all()


def test_shared_gallery_context_equals_the_gathered_one():
    """--top-k all: every query shares the gallery, which is never copied per query."""
    torch.manual_seed(0)
    x, t = torch.randn(3, 5), torch.tensor([1, 4, 7])
    m = T2VDenoiser(8)  # 3 text queries, a gallery of 5 videos
    text, frames = torch.randn(3, 8), torch.randn(5, 4, 8)
    mask = torch.rand(5, 4) > 0.3
    mask[:, 0] = True
    a = m.prepare_shared(text, frames, mask)
    b = m.prepare(text, frames.expand(3, -1, -1, -1), mask.expand(3, -1, -1))
    assert torch.allclose(m.denoise(x, t, a), m.denoise(x, t, b), atol=1e-5)
    m = V2TDenoiser(8)  # 3 video queries, a gallery of 5 texts
    texts, vframes = torch.randn(5, 8), torch.randn(3, 4, 8)
    a = m.prepare_shared(texts, vframes, mask[:3])
    b = m.prepare(texts.expand(3, -1, -1), vframes, mask[:3])
    assert torch.allclose(m.denoise(x, t, a), m.denoise(x, t, b), atol=1e-5)


def test_generator_and_cache_must_match(multi, tmp_path):
    cache, gen = multi
    # same stage-1 model (fingerprint), other data: the out-of-domain setting, accepted as is
    ood = synthetic_cache(tmp_path / "ood", n_train=6, n_test=5, seed=3, fingerprint=FP)
    out = tmp_path / "ood.json"
    run_cli("evaluate", "--cache", ood, "--generator", gen, "--steps", 5, "--json", out)
    assert read_json(out)["out_of_domain"] is True
    # another stage-1 model: refused in one line unless asked for; another width: always refused
    other = synthetic_cache(tmp_path / "other", n_train=6, n_test=5, fingerprint="0123456789abcdef")
    r = run_cli("evaluate", "--cache", other, "--generator", gen, ok=False)
    assert r.exit_code == 1 and "--allow-other-cache" in r.output and r.output.strip().count("\n") == 0
    run_cli("evaluate", "--cache", other, "--generator", gen, "--steps", 5, "--allow-other-cache")
    narrow = synthetic_cache(tmp_path / "narrow", n_train=6, n_test=5, width=8, fingerprint=FP)
    r = run_cli("evaluate", "--cache", narrow, "--generator", gen, "--allow-other-cache", ok=False)
    assert r.exit_code == 1 and "width 8" in r.output and r.output.strip().count("\n") == 0


def test_bad_evaluation_options_are_one_line(multi):
    cache, gen = multi
    for args, words in ((["--top-k", "many"], "--top-k"), (["--top-k", "0"], "--top-k"),
                        (["--steps", 11], "more than the generator's 10")):
        r = run_cli("evaluate", "--cache", cache, "--generator", gen, *args, ok=False)
        assert r.exit_code == 1 and words in r.output and r.output.strip().count("\n") == 0, r.output


def test_without_a_generator_and_other_samplers(multi, tmp_path):
    cache, gen = multi
    out = tmp_path / "m.json"
    run_cli("evaluate", "--cache", cache, "--dsl", "--json", out)
    assert set(read_json(out)["results"]) == {"discriminative", "dsl"}
    run_cli("evaluate", "--cache", cache, "--generator", gen, "--sampler", "ddpm", "--sample-steps", 5, "--no-clamp",
            "--json", out)
    report = read_json(out)
    assert (report["sampler"], report["steps"], report["clamp"]) == ("ddpm", 5, False)


def test_memory_budget_flag_streams_to_the_same_metrics(multi, tmp_path):
    cache, gen = multi
    runs = {}
    for name, budget in (("in_memory", "2"), ("streamed", "1e-9")):
        out = tmp_path / f"{name}.json"
        run_cli("evaluate", "--cache", cache, "--generator", gen, "--top-k", 3, "--steps", 5, "--dsl", "--qb-norm",
                "--memory-budget", budget, "--json", out)
        runs[name] = read_json(out)["results"]
    assert set(runs["streamed"]) == {"discriminative", "diffusion", "dsl", "qbnorm"}
    assert runs["streamed"] == runs["in_memory"]
    r = run_cli("evaluate", "--cache", cache, "--memory-budget", "0", ok=False)
    assert r.exit_code == 1 and "--memory-budget" in r.output and r.output.strip().count("\n") == 0, r.output
    r = run_cli("evaluate", "--cache", cache, "--memory-budget", "1e-9", "--save-sims", tmp_path / "s.npz", ok=False)
    assert r.exit_code == 1 and "save-sims" in r.output, r.output
