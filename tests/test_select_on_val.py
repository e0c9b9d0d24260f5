"""`--select-on val` (pipeline/selection.py) for both stages: the validation split (the dataset's or
the cache's own, else seeded held-out training videos), recorded in the manifest / generator.json,
the best raw-or-EMA weights kept through the epoch commits and resume, and the test split never read
while training (decoding and cache reads instrumented)."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import read_json, run_cli
from diffret.cache.manifest import held_out_videos
from diffret.cache.store import CacheReader
from diffret.generator.checkpoint import load_generator, load_train_state
from diffret.generator.config import GeneratorConfig
from diffret.generator.trainer import TrainingError, train_generator
from diffret.pipeline.selection import GeneratorSelection, Selector
from synthetic_cache import synthetic_cache

pytestmark = pytest.mark.usefixtures("one_thread")

GEN = dict(epochs=2, batch_size=8, candidates=4, train_steps=5, lr=1e-3, device="cpu")


def test_held_out_videos_are_seeded_order_free_and_leave_training_videos():
    ids = [f"v{i}" for i in range(40)]
    a = held_out_videos(ids, 0.1, seed=0)
    assert len(a) == 4 and a == sorted(a) and set(a) < set(ids)
    assert held_out_videos(list(reversed(ids)), 0.1, seed=0) == a
    assert held_out_videos(ids, 0.1, seed=1) != a
    assert held_out_videos(ids, 0.0, seed=0) == [] and len(held_out_videos(ids[:2], 0.9, 0)) == 1
    assert len(held_out_videos(ids[:3], 0.01, 0)) == 1  # at least one when asked for any


def test_selector_keeps_the_best_later_wins_ties_raw_wins_over_ema():
    scores = iter([10.0, 20.0, 30.0, 30.0, 25.0, 30.0])  # (raw, ema) per validation

    def evaluate(modules):
        with torch.no_grad():
            modules["m"].weight.fill_(next(scores))  # marks which weights were scored
        return {"t2v": {"R@1": float(modules["m"].weight[0, 0])}, "v2t": {"R@1": 0.0}}

    raw, ema = torch.nn.Linear(2, 1), torch.nn.Linear(2, 1)
    sel = Selector(evaluate, eval_every=2, log=lambda *a: None)
    cands = lambda: {"raw": {"m": raw}, "ema": {"m": ema}}  # noqa: E731
    sel.step(1, 1, cands)
    assert sel.best_state() is None  # not due
    sel.step(2, 1, cands)  # raw 10, ema 20 -> ema
    assert sel.best["record"] == {"step": 2, "epoch": 1, "weights": "ema", "t2v_R@1": 20.0}
    sel.epoch_end(3, 1, cands)  # raw 30 = ema 30 -> raw
    assert sel.best["record"]["weights"] == "raw" and sel.best["record"]["step"] == 3
    sel.epoch_end(3, 1, cands)  # already validated at this step: nothing
    sel.step(4, 2, cands)  # raw 25, ema 30 -> ema, ties the best: the later one wins
    assert sel.best["record"] == {"step": 4, "epoch": 2, "weights": "ema", "t2v_R@1": 30.0}
    assert float(sel.best_state()["m"]["weight"][0, 0]) == 30.0 and len(sel.evaluations) == 6
    again = Selector(evaluate, 2)
    again.load_state_dict(sel.state_dict())
    assert again.summary()["best"] == sel.summary()["best"] and again.evaluations == sel.evaluations


class SplitSpy:
    """Records every split read through CacheReader.text / .video."""

    def __init__(self, monkeypatch):
        self.splits: list[str] = []
        for name in ("text", "video"):
            orig = getattr(CacheReader, name)

            def spy(reader, split, *a, _orig=orig, **k):
                self.splits.append(split)
                return _orig(reader, split, *a, **k)

            monkeypatch.setattr(CacheReader, name, spy)


def test_generator_holds_out_validation_videos_and_never_reads_test(tmp_path, monkeypatch):
    cache = synthetic_cache(tmp_path / "cache", n_train=20, train_caps=2)
    spy = SplitSpy(monkeypatch)
    cfg = GeneratorConfig(select_on="val", val_fraction=0.2, eval_every=2, **GEN).validate()
    sel = GeneratorSelection(cache, cfg, log=lambda *a: None)
    meta = train_generator(cache, tmp_path / "gen", cfg, log=lambda *a: None, selection=sel)
    assert set(spy.splits) == {"train"}  # no val split in this cache: held out of train; test never read
    held = meta["selection"]["val"]["video_ids"]
    assert meta["selection"]["val"]["source"] == "held-out" and len(held) == 4
    assert held == held_out_videos([f"train{i}" for i in range(20)], 0.2, 0)
    assert meta["cache"]["train_captions"] == 2 * (20 - 4)  # their captions are not trained on
    best = meta["selection"]["best"]
    assert best["t2v_R@1"] == max(e["t2v_R@1"] for e in meta["selection"]["evaluations"])
    # evaluated every 2 steps and at each epoch end (4 steps an epoch: steps 2, 4, 6, 8), raw and EMA
    assert [(e["step"], e["weights"]) for e in meta["selection"]["evaluations"]] == [
        (s, w) for s in (2, 4, 6, 8) for w in ("raw", "ema")]
    # generator.pt holds the best weights, and generator.json records the choice (read back as committed)
    gen = load_generator(tmp_path / "gen")
    kept = sel.selector.best_state()
    assert all(torch.equal(v, kept["t2v"][k]) for k, v in gen.t2v.state_dict().items())
    assert read_json(tmp_path / "gen" / "generator.json")["selection"]["best"] == best
    assert load_train_state(tmp_path / "gen")["selection"]["best"]["record"] == best


def cache_with_val(root, n=(16, 6, 6), caps=2, width=16, words=6, frames=4, seed=0):
    """A random cache (as synthetic_cache.py) with train, val and test splits."""
    import numpy as np

    from diffret.cache.manifest import Manifest
    from diffret.cache.store import CacheWriter

    rng = np.random.default_rng(seed)
    man = Manifest(width=width, n_words=words, n_frames=frames, dataset="synthetic", extract_config={},
                   model={"name": "synthetic", "pretrained": "none", "fingerprint": "synthetic0000000"})
    w = CacheWriter(root, man, shard_rows=64)
    for split, nv in zip(("train", "val", "test"), n):
        z = rng.normal(size=(nv, width))
        vids = [f"{split}{i}" for i in range(nv)]
        w.add_video(split, vids, [f"/{v}.mp4" for v in vids], z[:, None] + rng.normal(size=(nv, frames, width)),
                    np.ones((nv, frames), bool), rng.normal(size=(nv, frames)))
        cv = np.repeat(np.arange(nv), caps)
        w.add_text(split, [f"{split}c{i}" for i in range(len(cv))], [vids[v] for v in cv], ["a caption"] * len(cv),
                   z[cv] + rng.normal(size=(len(cv), width)), z[cv][:, None] + rng.normal(size=(len(cv), words, width)),
                   np.ones((len(cv), words), bool), rng.normal(size=(len(cv), words)))
    w.close()
    return root


def test_generator_uses_the_caches_val_split_and_keeps_the_best_through_resume(tmp_path, monkeypatch):
    cache = cache_with_val(tmp_path / "cache")
    spy = SplitSpy(monkeypatch)
    cfg1 = GeneratorConfig(select_on="val", eval_every=3, **{**GEN, "epochs": 1}).validate()
    m1 = train_generator(cache, tmp_path / "gen", cfg1, log=lambda *a: None,
                         selection=GeneratorSelection(cache, cfg1, log=lambda *a: None))
    assert m1["selection"]["val"] == {"source": "cache", "videos": 6, "video_ids": [f"val{i}" for i in range(6)]}
    assert m1["cache"]["train_captions"] == 32  # nothing held out of train
    cfg2 = GeneratorConfig(select_on="val", eval_every=3, **GEN).validate()
    sel = GeneratorSelection(cache, cfg2, log=lambda *a: None)
    meta = train_generator(cache, tmp_path / "gen", cfg2, log=lambda *a: None, resume=True, selection=sel)
    assert "test" not in spy.splits and {"train", "val"} <= set(spy.splits)
    steps = [e["step"] for e in meta["selection"]["evaluations"] if e["weights"] == "raw"]
    assert steps == [3, 4, 6, 8]  # epoch 1's evaluations came back with the resumed state
    assert meta["selection"]["best"]["t2v_R@1"] == max(e["t2v_R@1"] for e in meta["selection"]["evaluations"])
    with pytest.raises(TrainingError, match="--select-on val needs"):
        train_generator(cache, tmp_path / "other", cfg2, log=lambda *a: None)


def test_train_generator_cli_select_on_val_and_its_errors(tmp_path):
    cache = synthetic_cache(tmp_path / "cache", n_train=12, train_caps=2)
    flags = ["--epochs", 1, "--batch-size", 8, "--candidates", 4, "--steps", 5, "--lr", "1e-3", "--device", "cpu"]
    out = run_cli("train-generator", "--cache", cache, "--out", tmp_path / "gen", *flags, "--select-on", "val").output
    assert "kept the best on validation" in out
    assert read_json(tmp_path / "gen" / "generator.json")["selection"]["val"]["source"] == "held-out"
    bad = run_cli("train-generator", "--cache", cache, "--out", tmp_path / "gen2", *flags, "--select-on", "val",
                  "--val-fraction", "0", ok=False)
    assert bad.exit_code == 1 and "holds out none" in bad.output and "Traceback" not in bad.output


@pytest.mark.slow
def test_extract_select_on_val_never_decodes_test_videos_while_training(demo_root, tmp_path, monkeypatch):
    """The demo set (MSRVTT layout, no val split): 25% of the training videos held out, validated every
    2 steps; until the dump starts no test video is decoded; the held-out videos are the cache's val split."""
    import diffret.extract.data as data
    import diffret.extract.stage1 as stage1

    decoded: list[str] = []
    orig_decode, orig_dump = data._decode, stage1.dump_videos
    monkeypatch.setattr(data, "_decode", lambda path, *a, **k: decoded.append(str(path)) or orig_decode(path, *a, **k))
    monkeypatch.setattr(stage1, "dump_videos", lambda *a, **k: decoded.append("DUMP") or orig_dump(*a, **k))
    out = tmp_path / "cache"
    run_cli("extract", "--dataset", "msrvtt", "--data-root", demo_root, "--out", out, "--model", "tiny", "--pretrained",
            "none", "--epochs", 1, "--batch-size", 8, "--lr", "1e-3", "--clip-lr-scale", 1, "--fps", "uniform",
            "--workers", 0, "--select-on", "val", "--val-fraction", "0.25", "--eval-every", 2)
    training = decoded[:decoded.index("DUMP")]
    from diffret.extract.annotations import load_annotations

    reader, ann = CacheReader(out), load_annotations("msrvtt", demo_root)
    test_paths = {str(ann.videos[v]) for v in reader.video("test").video_id}
    val_paths = {str(ann.videos[v]) for v in reader.video("val").video_id}
    assert training and not test_paths & set(training)  # the test split is never read while training
    assert val_paths <= set(training)  # validated on the held-out videos
    manifest = json.loads((out / "manifest.json").read_text())
    sel = manifest["selection"]
    assert sel["on"] == "val" and sel["val"]["source"] == "held-out"
    assert sorted(reader.video("val").video_id) == sel["val"]["video_ids"]
    assert not set(sel["val"]["video_ids"]) & set(reader.video("train").video_id)  # held out of training
    assert sel["best"]["weights"] in ("raw", "ema") and sel["best"]["t2v_R@1"] >= 0
    ckpt = torch.load(out / "stage1.pt", map_location="cpu", weights_only=False)
    assert ckpt["selection"]["best"] == sel["best"] and len(ckpt["selection"]["evaluations"]) >= 4


@pytest.mark.slow
def test_extract_select_on_val_keeps_the_best_through_resume(demo_root, tmp_path):
    """Killed at epoch 2, resumed: the best so far (and the EMA) came back with the epoch-1 state, so
    the kept weights and every evaluation equal an uninterrupted run's."""
    from dataclasses import replace

    from diffret.extract.config import ExtractConfig
    from diffret.extract.stage1 import run_stage1
    from diffret.pipeline.recipes import stage1_hooks
    from test_stage1_runs import KillAt, Killed

    cfg = ExtractConfig(dataset="msrvtt", data_root=str(demo_root), model="tiny", pretrained="none", epochs=2,
                        batch_size=8, lr=1e-3, clip_lr_scale=1.0, target_fps=None, workers=0, decode_timeout=None,
                        select_on="val", val_fraction=0.25, eval_every=4)
    quiet = lambda *a: None  # noqa: E731
    whole = run_stage1(cfg, tmp_path / "whole", hooks=stage1_hooks(), log=quiet)
    with pytest.raises(Killed):
        run_stage1(cfg, tmp_path / "cut", hooks=stage1_hooks(), progress=KillAt("fine-tune epoch 2/2"), log=quiet)
    state = torch.load(tmp_path / "cut" / "train-state.pt", map_location="cpu", weights_only=False)
    assert state["selection"]["best"] is not None and state["ema"] is not None
    cut = run_stage1(cfg, tmp_path / "cut", hooks=stage1_hooks(), resume_training=True, log=quiet)
    assert cut["fingerprint"] == whole["fingerprint"]
    a, b = (torch.load(d / "stage1.pt", map_location="cpu", weights_only=False)["selection"]
            for d in (tmp_path / "whole", tmp_path / "cut"))
    assert a == b and a["evaluations"]
    with pytest.raises(ValueError, match="needs the validator"):
        run_stage1(replace(cfg, recipe="modern"), tmp_path / "nohooks", log=quiet)


def test_extract_select_on_val_without_any_validation_videos_is_one_line(demo_root, tmp_path):
    out = tmp_path / "cache"
    r = run_cli("extract", "--dataset", "msrvtt", "--data-root", demo_root, "--out", out, "--model", "tiny",
                "--pretrained", "none", "--epochs", 1, "--workers", 0, "--select-on", "val", "--val-fraction", "0",
                ok=False)
    assert r.exit_code == 1 and "holds out none" in r.output and "Traceback" not in r.output
    assert not out.exists()  # refused before anything was written
