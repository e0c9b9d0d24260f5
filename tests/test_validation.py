"""Impossible settings are refused before any work, with one line; no non-finite feature is written
or trusted (issue 12, items 3 and 7)."""
from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from diffret.cache.manifest import CacheError, Manifest
from diffret.cache.store import CacheWriter
from diffret.extract.config import ExtractConfig
from diffret.generator.config import GeneratorConfig
from diffret.generator.denoiser import MAX_TIMESTEPS
from diffret.generator.features import load_split
from diffret.generator.trainer import TrainingError, train_generator
from diffret.pipeline.cli import main
from diffret.pipeline.evaluate import EvalOptions, evaluate
from diffret.pipeline.sweep import SweepGrid

from synthetic_cache import synthetic_cache

NAN, INF = float("nan"), float("inf")


def refused(*args):
    """Run `diffret args`; assert exit 1 with a one-line `Error: ...`, no traceback. -> the line."""
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert result.exit_code == 1, result.output
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    return lines[0]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return synthetic_cache(tmp_path_factory.mktemp("v") / "cache", n_train=8, n_test=4)


# ----------------------------------------------------------------- options: finite, in range

@pytest.mark.parametrize("kw", [
    dict(lr=NAN), dict(lr=INF), dict(dsl_temp=INF), dict(warmup=NAN), dict(warmup=1.5), dict(epochs=-1),
    dict(decode_timeout=0.0), dict(decode_timeout=NAN), dict(grad_clip=0.0), dict(clip_lr_scale=-1.0),
    dict(adam_betas=(0.9, NAN)), dict(adam_eps=0.0), dict(weight_decay=INF), dict(workers=-1), dict(shard_rows=0),
])
def test_extract_config_refuses(kw):
    with pytest.raises(ValueError, match="^--"):
        ExtractConfig(**kw)


def test_extract_config_defaults_pass():
    ExtractConfig()
    ExtractConfig(decode_timeout=None, epochs=0)


@pytest.mark.parametrize("flag, value", [("--lr", "nan"), ("--epochs", "-1"), ("--decode-timeout", "0"),
                                         ("--warmup", "inf"), ("--grad-clip", "nan")])
def test_extract_cli_refuses_before_work(tmp_path, flag, value):
    out = tmp_path / "cache"
    line = refused("extract", "--dataset", "msrvtt", "--data-root", tmp_path, "--out", out, flag, value)
    assert flag in line
    assert not out.exists()


@pytest.mark.parametrize("kw", [dict(lr=NAN), dict(beta_scale=INF), dict(ema=NAN), dict(grad_clip=0.0),
                                dict(temp=INF), dict(weight_decay=NAN), dict(train_steps=MAX_TIMESTEPS + 1),
                                dict(train_steps=6000)])
def test_generator_config_refuses(kw):
    with pytest.raises(ValueError):
        GeneratorConfig(**kw).validate()


def test_generator_steps_bound_is_the_table():
    GeneratorConfig(train_steps=MAX_TIMESTEPS).validate()
    from diffret.generator.denoiser import PositionalEncoding
    assert PositionalEncoding(8).pe.shape[0] == MAX_TIMESTEPS


@pytest.mark.parametrize("flag, value", [("--steps", "6000"), ("--steps", "5001"), ("--lr", "nan"),
                                         ("--ema", "inf"), ("--beta-scale", "nan")])
def test_train_generator_cli_refuses_before_work(cache, tmp_path, flag, value):
    out = tmp_path / "gen"
    line = refused("train-generator", "--cache", cache, "--out", out, flag, value)
    assert flag in line
    assert not out.exists()


@pytest.mark.parametrize("kw", [dict(alpha=INF), dict(alpha=-INF), dict(alpha=NAN), dict(alpha=1e300),
                                dict(alpha=-1e300), dict(temp=NAN), dict(temp=INF), dict(temp=1e300), dict(temp=0.0),
                                dict(dsl_temp=INF), dict(qb_beta=NAN), dict(qb_beta=1e300), dict(top_k=0),
                                dict(sample_steps=0), dict(memory_budget=0), dict(qb_k=0)])
def test_eval_options_refuse(kw):
    with pytest.raises(ValueError, match="^--"):
        EvalOptions(**kw)


def test_eval_options_sane_values_pass():
    EvalOptions(alpha=-0.7, temp=1e4, top_k=None, sample_steps=None, memory_budget=None)
    EvalOptions(alpha=0.0)


@pytest.mark.parametrize("flag, value", [("--alpha", "inf"), ("--alpha", "1e300"), ("--alpha", "-inf"),
                                         ("--alpha", "nan"), ("--temp", "inf"), ("--temp", "nan"),
                                         ("--qb-beta", "nan"), ("--dsl-temp", "inf"), ("--memory-budget", "nan"),
                                         ("--memory-budget", "inf")])
def test_evaluate_cli_refuses(cache, tmp_path, flag, value):
    js = tmp_path / "m.json"
    line = refused("evaluate", "--cache", cache, flag, value, "--json", js)
    assert flag in line and "cannot convert" not in line
    assert not js.exists()


def test_evaluate_api_refuses(cache):
    with pytest.raises(ValueError, match="--alpha"):
        evaluate(cache, None, alpha=INF)


@pytest.mark.parametrize("flag, value", [("--top-k", "0"), ("--steps", "0"), ("--steps", "6000"), ("--lr", "nan"),
                                         ("--seeds", "-1")])
def test_sweep_refuses_before_training(cache, tmp_path, flag, value):
    out = tmp_path / "sweep"
    line = refused("sweep", "--cache", cache, "--out", out, "--epochs", 1, flag, value)
    assert flag in line
    assert not out.exists()


def test_sweep_grid_refuses():
    with pytest.raises(ValueError, match="--steps"):
        SweepGrid(steps=[10, 0])


# ----------------------------------------------------------------- output paths, before the work

def test_json_and_save_sims_folders_refused_before_work(cache, tmp_path):
    folder = tmp_path / "a_folder"
    folder.mkdir()
    assert "--json" in refused("evaluate", "--cache", cache, "--json", folder)
    assert "--save-sims" in refused("evaluate", "--cache", cache, "--save-sims", folder)
    assert list(folder.iterdir()) == []  # no temporary left behind
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    assert "--json" in refused("evaluate", "--cache", cache, "--json", a_file / "m.json")


def test_out_file_refused_before_work(cache, tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("keep")
    assert "--out" in refused("train-generator", "--cache", cache, "--out", a_file, "--epochs", 1)
    assert "--out" in refused("sweep", "--cache", cache, "--out", a_file, "--epochs", 1)
    assert a_file.read_text() == "keep"


def test_metrics_json_is_standard(cache, tmp_path, monkeypatch):
    """Whatever the report holds, the JSON writer never emits NaN / Infinity."""
    import diffret.pipeline.commands.evaluate as cmd

    real = cmd.evaluate
    monkeypatch.setattr(cmd, "evaluate", lambda *a, **k: {**real(*a, **k), "alpha": INF})
    js = tmp_path / "m.json"
    result = CliRunner().invoke(main, ["evaluate", "--cache", str(cache), "--json", str(js)], catch_exceptions=False)
    assert result.exit_code == 1 and result.output.strip().splitlines()[-1].startswith("Error: "), result.output
    assert not js.exists()
    monkeypatch.setattr(cmd, "evaluate", real)
    CliRunner().invoke(main, ["evaluate", "--cache", str(cache), "--json", str(js)], catch_exceptions=False)
    json.loads(js.read_text(), parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))


# ----------------------------------------------------------------- training that cannot learn, K used

def test_one_video_training_split_refused(tmp_path):
    cache = synthetic_cache(tmp_path / "c", n_train=1, train_caps=6, n_test=3)
    out = tmp_path / "gen"
    with pytest.raises(TrainingError, match="negatives"):
        train_generator(cache, out, GeneratorConfig(epochs=1, train_steps=10, batch_size=4, candidates=4))
    assert not (out / "generator.json").exists() and not (out / "generator.pt").exists()
    refused("train-generator", "--cache", cache, "--out", out, "--epochs", 1, "--steps", 10)


def test_effective_candidates_recorded(cache, tmp_path):
    logs = []
    meta = train_generator(cache, tmp_path / "gen", GeneratorConfig(epochs=1, train_steps=10, batch_size=4,
                                                                    candidates=500), log=logs.append)
    assert meta["config"]["candidates"] == 500 and meta["effective_candidates"] == 4
    saved = json.loads((tmp_path / "gen" / "generator.json").read_text())
    assert saved["effective_candidates"] == 4
    assert any("K = 4" in m for m in logs)


# ----------------------------------------------------------------- non-finite features

def _writer(root):
    man = Manifest(width=4, n_words=3, n_frames=2, dataset="synthetic", extract_config={},
                   model={"name": "synthetic", "pretrained": "none", "fingerprint": "f" * 16})
    return CacheWriter(Path(root), man, shard_rows=8)


@pytest.mark.parametrize("bad", [NAN, INF, 1e6])  # 1e6 is inf in the cache's float16
def test_writer_refuses_non_finite_rows(tmp_path, bad):
    w = _writer(tmp_path / "c")
    frames = np.zeros((3, 2, 4), np.float32)
    frames[1, 0, 2] = bad
    with pytest.raises(CacheError, match="'v1'.*frames|frames.*'v1'"):
        w.add_video("train", ["v0", "v1", "v2"], ["a", "b", "c"], frames, np.ones((3, 2), bool), np.zeros((3, 2)))
    logits = np.zeros((2, 3), np.float32)
    logits[1, 1] = bad
    with pytest.raises(CacheError, match="'c1'"):
        w.add_text("train", ["c0", "c1"], ["v0", "v0"], ["x", "y"], np.zeros((2, 4)), np.zeros((2, 3, 4)),
                   np.ones((2, 3), bool), logits)
    assert not w._pending.get(("video", "train")) or not w._pending[("video", "train")].index_rows


def test_load_refuses_non_finite_features(tmp_path):
    cache = synthetic_cache(tmp_path / "c", n_train=4, n_test=3)
    shard = next((cache / "shards").glob("video-test-*"))
    with h5py.File(shard, "r+") as f:
        f["frame_logits"][1, 0] = np.inf
    with pytest.raises(CacheError, match="frame_logits.*test.*'test1'"):
        load_split(cache, "test")
    line = refused("evaluate", "--cache", cache)
    assert "frame_logits" in line and str(cache) in line


def test_demo_config_refuses(tmp_path):
    from diffret.pipeline.demo import DemoConfig

    with pytest.raises(ValueError, match="--seconds"):
        DemoConfig(seconds=NAN)
    assert "--train" in refused("demo-data", tmp_path / "d", "--train", -1)
    assert not (tmp_path / "d").exists()
