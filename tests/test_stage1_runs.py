"""Whole stage-1 runs on a small manifest of demo clips: two processes under torchrun equal one,
an interrupted fine-tuning resumes to the same weights, a finished stage1.pt is reused, and
--stage1 dumps with an existing model."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import run_cli
from diffret.cache.store import CacheReader
from diffret.extract.annotations import load_msrvtt
from diffret.extract.checkpoint import CheckpointError
from diffret.extract.config import ExtractConfig
from diffret.extract.stage1 import run_stage1
from diffret.pipeline.recipes import stage1_hooks

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]  # every test reads extract runs of demo clips

WORKER = Path(__file__).with_name("ddp_worker.py")
RECIPE = dict(model="tiny", pretrained="none", epochs=2, batch_size=4, frames=4, words=16, lr=1e-3, clip_lr_scale=1.0,
              target_fps=None, workers=0, decode_timeout=None)  # decode in-process: no fork per video
FLAGS = ["--dataset", "manifest", "--model", "tiny", "--pretrained", "none", "--epochs", "2", "--batch-size", "4",
         "--frames", "4", "--words", "16", "--lr", "1e-3", "--clip-lr-scale", "1", "--fps", "uniform", "--workers", "0"]


@pytest.fixture(scope="module")
def small_set(demo_root, tmp_path_factory) -> Path:
    """manifest.csv over 8 training clips (one caption each) and 4 test clips, one with 2 captions."""
    ann = load_msrvtt(demo_root)
    rows = ["video,caption,split,video_id"]
    for vid in ann.video_ids("train")[:8]:
        text = next(c.text for c in ann.split("train") if c.video_id == vid)
        rows.append(f"{ann.videos[vid]},\"{text}\",train,{vid}")
    for i, c in enumerate(ann.split("test")[:4]):
        rows.append(f"{ann.videos[c.video_id]},\"{c.text}\",test,{c.video_id}")
        if i == 0:
            rows.append(f"{ann.videos[c.video_id]},a second description of the same clip,test,{c.video_id}")
    path = tmp_path_factory.mktemp("small") / "manifest.csv"
    path.write_text("\n".join(rows) + "\n")
    return path


@pytest.fixture(scope="module")
def reference(small_set, tmp_path_factory) -> Path:
    """One process, 2 epochs of 2 steps: the cache every other run is compared with."""
    out = tmp_path_factory.mktemp("ref") / "cache"
    run_cli("extract", "--data-root", small_set, "--out", out, *FLAGS)
    return out


def assert_same_cache(a: Path, b: Path, atol: float) -> None:
    ra, rb = CacheReader(a), CacheReader(b)
    assert ra.manifest.splits == rb.manifest.splits and ra.splits == ["test", "train"]
    for split in ra.splits:
        ta, tb = ra.text(split), rb.text(split)
        assert (ta.caption_id, ta.video_id, ta.caption) == (tb.caption_id, tb.video_id, tb.caption)
        assert np.array_equal(ta.word_mask, tb.word_mask)
        for name in ("sentence", "words", "word_logits"):
            np.testing.assert_allclose(getattr(ta, name), getattr(tb, name), atol=atol, rtol=atol, err_msg=name)
        va, vb = ra.video(split), rb.video(split)
        assert va.video_id == vb.video_id and np.array_equal(va.frame_mask, vb.frame_mask)
        for name in ("frames", "frame_logits"):
            np.testing.assert_allclose(getattr(va, name), getattr(vb, name), atol=atol, rtol=atol, err_msg=name)


def test_reference_cache_keeps_one_row_per_caption(reference):
    test = CacheReader(reference).text("test")
    assert len(test) == 5 and len(set(test.video_id)) == 4  # the multi-caption protocol needs both rows
    assert test.video_id[0] == test.video_id[1] and test.caption[1] == "a second description of the same clip"


@pytest.fixture(scope="module")
def reference_modern(small_set, tmp_path_factory) -> Path:
    """The reference under `--recipe modern` (float32 weights throughout)."""
    out = tmp_path_factory.mktemp("ref-modern") / "cache"
    run_cli("extract", "--data-root", small_set, "--out", out, *FLAGS, "--recipe", "modern")
    return out


def test_two_processes_under_torchrun_equal_one(small_set, reference_modern, tmp_path):
    """Gathered negatives, sharded batches and per-rank parts merged by rank 0: the same cache.

    Under `--recipe modern`: with the original recipe's float16 CLIP weights the summation order of
    two processes flips roundings (one float16 ulp, ~5e-4 at |w| ~ 1), beyond these tolerances."""
    reference = reference_modern
    out = tmp_path / "ddp"
    # --standalone: the rendezvous store binds port 0 (the kernel picks a free one, no race for it) and the
    # workers' process group reuses that store; pinned on, as a "1" here would pick a port by probing
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(WORKER.parent),
           "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "0"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(WORKER),
           "extract", "--data-root", str(small_set), "--out", str(out), *FLAGS, "--recipe", "modern"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert_same_cache(reference, out, atol=2e-3)
    a = torch.load(reference / "stage1.pt", weights_only=False)["state_dict"]
    b = torch.load(out / "stage1.pt", weights_only=False)["state_dict"]
    for name in a:  # one Adam step moves a weight by about lr = 1e-3; rounding differs by ~1e-6
        assert torch.allclose(a[name], b[name], atol=5e-5), name
    shards = sorted(p.name for p in (out / "shards").iterdir())
    assert any(n.endswith("-r000.h5") for n in shards) and any(n.endswith("-r001.h5") for n in shards)
    assert not (out / "parts").exists() and not (out / "progress").exists()
    from diffret.cache.verify import verify_cache

    assert verify_cache(out)["splits"] == CacheReader(reference).manifest.splits  # checksums, index, counts


class Killed(Exception):
    pass


class KillAt:
    """A progress display that kills the run when a task with this title starts."""

    def __init__(self, title: str):
        self.title = title

    def add_task(self, description, **kwargs):
        if description.startswith(self.title):
            raise Killed(description)
        return 0

    def update(self, *args, **kwargs):
        pass

    def remove_task(self, *args):
        pass


def test_resume_reuse_and_stage1_checkpoint(small_set, reference, tmp_path):
    cfg = ExtractConfig(dataset="manifest", data_root=str(small_set.resolve()), **RECIPE)
    ref_fp = CacheReader(reference).manifest.fingerprint
    out = tmp_path / "cut"

    # Killed during epoch 2: the epoch-1 state is kept; without --resume the run says what to do.
    with pytest.raises(Killed):
        run_stage1(cfg, out, hooks=stage1_hooks(), progress=KillAt("fine-tune epoch 2/2"), log=lambda *a: None)
    assert (out / "train-state.pt").is_file() and not (out / "stage1.pt").exists()
    with pytest.raises(CheckpointError, match=r"unfinished fine-tuning \(1 of 2 epochs done\); pass --resume"):
        run_stage1(cfg, out, hooks=stage1_hooks(), log=lambda *a: None)
    logs: list[str] = []
    summary = run_stage1(cfg, out, hooks=stage1_hooks(), resume_training=True, log=logs.append)
    assert "resuming fine-tuning after epoch 1 of 2" in logs
    assert summary["fingerprint"] == ref_fp  # bit-identical weights to the uninterrupted run
    assert not (out / "train-state.pt").exists()
    assert_same_cache(reference, out, atol=0)

    # The dump lost its manifest (killed before the end): the same command reuses stage1.pt.
    (out / "manifest.json").unlink()
    logs.clear()
    assert run_stage1(cfg, out, hooks=stage1_hooks(), log=logs.append)["fingerprint"] == ref_fp
    assert any("reusing the finished fine-tuning" in m for m in logs) and not any("fine-tuned" in m for m in logs)
    (out / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match=r"another recipe \(lr was 0\.001, now 0\.002\)"):
        run_stage1(replace(cfg, lr=2e-3), out, hooks=stage1_hooks(), log=lambda *a: None)

    # --stage1: another cache from the same stage-1 model, no fine-tuning, same features; the model's
    # own rules (the WTI rule it trained with, its padded frame slots) come with it, not from the flags.
    other = tmp_path / "other"
    shutil.copy(small_set, tmp_path / "manifest.csv")
    r = run_cli("extract", "--dataset", "manifest", "--data-root", tmp_path / "manifest.csv", "--out", other,
                "--stage1", reference / "stage1.pt", "--frames", "4", "--words", "16", "--fps", "uniform",
                "--workers", "0", "--epochs", "3", "--wti-padding", "exclude", "--frame-padding", "zero-feature")
    assert "no fine-tuning" in r.output
    manifest = CacheReader(other).manifest
    assert manifest.fingerprint == ref_fp and manifest.model["name"] == "tiny"
    assert manifest.wti_padding == CacheReader(reference).manifest.wti_padding == "zero"
    assert manifest.extract_config["frame_padding"] == "zero-frame"
    assert manifest.extract_config["epochs"] == 0 and manifest.extract_config["stage1"].endswith("stage1.pt")
    # the cache holds the model its queries are encoded with (search needs it): the same bytes
    assert (other / "stage1.pt").read_bytes() == (reference / "stage1.pt").read_bytes()
    assert_same_cache(reference, other, atol=0)
    r = run_cli("extract", "--dataset", "manifest", "--data-root", small_set, "--out", reference, "--overwrite",
                "--stage1", reference / "stage1.pt", ok=False)
    assert r.exit_code == 1 and "lies inside --out" in r.output and (reference / "stage1.pt").is_file()
