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
from diffret.pipeline.evaluate import ground_truth
from diffret.pipeline.metrics import recall_metrics, retrieval_metrics, v2t_ranks
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
    # 3 videos; captions 0, 1 -> video 0, captions 2, 3 -> video 1; video 2 has no caption.
    cv = torch.tensor([0, 0, 1, 1])
    t2v = torch.tensor([[0.9, 0.1, 0.5], [0.2, 0.8, 0.1], [0.3, 0.4, 0.9], [0.1, 0.6, 0.2]])  # ranks 1, 2, 2, 1
    v2t = torch.tensor([[0.6, 0.2, 0.5, 0.4],   # v0 scores (v0, v1) = (max(0.6, 0.2), max(0.5, 0.4)) = (0.6, 0.5) -> 1
                        [0.9, 0.8, 0.7, 0.1],   # v1: (0.9, 0.7): v0 above its own -> 2
                        [0.9, 0.9, 0.9, 0.9]])  # v2: no caption, no v2t query
    # The old protocol (a video found at the best rank of its captions among all captions) gave v1
    # 1 + |{0.9, 0.8}| = 3: both captions of v0 above, where the field's counts v0 once.
    m = retrieval_metrics(t2v, v2t, cv)
    assert m["t2v"]["MnR"] == pytest.approx(6 / 4) and m["t2v"]["R@1"] == pytest.approx(50.0)
    assert m["v2t"]["MnR"] == 1.5 and m["v2t"]["R@1"] == 50.0  # ranks (1, 2); video 2 is no v2t query
    t2v_gt, v2t_gt = ground_truth(cv, 3)
    assert t2v_gt.tolist() == [0, 0, 1, 1] and v2t_gt.tolist() == [[0, 1], [2, 3], [-1, -1]]
    assert ground_truth(torch.tensor([1, 0]), 2)[1].tolist() == [1, 0]  # one caption each: [Nv]


def v2t_ranks_from_file(v2t: np.ndarray, v2t_gt: np.ndarray) -> np.ndarray:
    """The v2t protocol from a --save-sims file alone: gallery video g scored by the max of the query
    video's row over g's caption columns (v2t_gt[g], -1 = padding), the query's own video ranked
    among the videos (1 + the others at or above it); videos without captions are no queries."""
    gt = v2t_gt[:, None] if v2t_gt.ndim == 1 else v2t_gt
    nv = len(gt)
    m = np.full((nv, nv), -np.inf)
    for g in range(nv):
        cols = gt[g][gt[g] >= 0]
        if len(cols):
            m[:, g] = v2t[:, cols].max(1)
    queries = [q for q in range(nv) if (gt[q] >= 0).any()]
    return np.array([(m[q] >= m[q, q]).sum() for q in queries])


@pytest.mark.slow
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
        # recompute from the file alone: t2v by t2v_gt, v2t by the groups v2t_gt (-1 = padding)
        t2v_np = t2v.numpy()
        right = t2v_np[np.arange(18), z["t2v_gt"]]
        assert recall_metrics(torch.from_numpy((t2v_np >= right[:, None]).sum(1))) == pytest.approx(metrics["t2v"])
        assert recall_metrics(torch.from_numpy(v2t_ranks_from_file(v2t.numpy(), z["v2t_gt"]))) == \
            pytest.approx(metrics["v2t"])
    S = torch.from_numpy(z["discriminative_t2v"])
    assert torch.allclose(torch.from_numpy(z["dsl_t2v"]), dual_softmax(S, 1.0, 100.0), rtol=1e-5)
    # the diffusion row's v2t max over captions runs on the re-scored matrix (not on S^T)
    s_v2t = torch.from_numpy(z["diffusion_v2t"])
    assert not torch.equal(s_v2t, S.t())
    cv = torch.from_numpy(z["t2v_gt"])
    assert recall_metrics(v2t_ranks(s_v2t, cv)) == pytest.approx(report["results"]["diffusion"]["v2t"])
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_bad_evaluation_options_are_one_line(multi):
    cache, gen = multi
    for args, words in ((["--top-k", "many"], "--top-k"), (["--top-k", "0"], "--top-k"),
                        (["--steps", 11], "more than the generator's 10")):
        r = run_cli("evaluate", "--cache", cache, "--generator", gen, *args, ok=False)
        assert r.exit_code == 1 and words in r.output and r.output.strip().count("\n") == 0, r.output


@pytest.mark.slow
def test_without_a_generator_and_other_samplers(multi, tmp_path):
    cache, gen = multi
    out = tmp_path / "m.json"
    run_cli("evaluate", "--cache", cache, "--dsl", "--json", out)
    assert set(read_json(out)["results"]) == {"discriminative", "dsl"}
    run_cli("evaluate", "--cache", cache, "--generator", gen, "--sampler", "ddpm", "--sample-steps", 5, "--no-clamp",
            "--json", out)
    report = read_json(out)
    assert (report["sampler"], report["steps"], report["clamp"]) == ("ddpm", 5, False)


@pytest.mark.slow
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
