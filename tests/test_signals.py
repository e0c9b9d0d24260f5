"""Ctrl-C (SIGINT) and SIGTERM, sent from outside to a real `diffret` process, stop it promptly
(generous bound: within 60 s), and running the command again (with --resume where the run says so)
ends exactly as the uninterrupted run: the same cache tensor for tensor and byte for byte, the same
generator weights. Every process here runs with one thread, so the runs are comparable bit for bit."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from diffret.cache.layout import STAGE1_FILE, TRAIN_STATE_FILE
from diffret.generator.checkpoint import COMMIT_NAME, META_NAME, STATE_NAME, WEIGHTS_NAME
from synthetic_cache import synthetic_cache
from test_cache_integrity import assert_same_cache
from test_extract_resume import FLAGS as RESUME_FLAGS
from tiny_msrvtt import demo_subset

pytestmark = pytest.mark.slow  # whole extract / train-generator runs in subprocesses

FLAGS = list(RESUME_FLAGS)
FLAGS[FLAGS.index("--epochs") + 1] = "2"  # two epochs: a signal after the first lands inside the fine-tuning
GEN = ["--batch-size", "8", "--candidates", "4", "--steps", "10", "--lr", "1e-3", "--epochs", "4"]
STOP_WITHIN = 60  # seconds: a test bound, not a benchmark
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
CODE = "import torch; torch.set_num_threads(1); from diffret.pipeline.cli import main; main()"


def diffret(*args) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-c", CODE, *map(str, args)], capture_output=True, text=True, env=ENV,
                          timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    return proc


def interrupt(args, when, sig) -> subprocess.CompletedProcess:
    """Start `diffret args`, send `sig` as soon as `when()` holds, and wait for it to stop. (A run that
    finished before this process saw `when()` hold, which a starved poller could allow, is returned with
    stderr "finished before the signal": the tests then compare the finished run, never fail on timing.)"""
    proc = subprocess.Popen([sys.executable, "-c", CODE, *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=ENV)
    try:
        deadline = time.monotonic() + 600
        while not when() and proc.poll() is None:
            assert time.monotonic() < deadline, "the run never reached the point to interrupt"
            time.sleep(0.002)
        sent = proc.poll() is None
        if sent:
            proc.send_signal(sig)
            start = time.monotonic()
            out, _ = proc.communicate(timeout=STOP_WITHIN)  # raises TimeoutExpired if it keeps running
            assert time.monotonic() - start < STOP_WITHIN
        else:
            out, _ = proc.communicate()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "Traceback" not in out, out[-3000:]  # Ctrl-C stops without a stack dump
    if sent:
        assert proc.returncode != 0, out[-3000:]
    return subprocess.CompletedProcess(args, proc.returncode, out, "" if sent else "finished before the signal")


@pytest.fixture(scope="module")
def small(demo_root, tmp_path_factory) -> Path:
    return demo_subset(demo_root, tmp_path_factory.mktemp("sig-small") / "data", n_train=8, captions=2, n_test=4)


@pytest.fixture(scope="module")
def reference(small, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sig-ref") / "cache"
    diffret("extract", "--data-root", small, "--out", out, *FLAGS)
    return out


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_extract_interrupted_in_fine_tuning_resumes_to_the_same_cache(small, reference, tmp_path, sig):
    out = tmp_path / "cache"
    cmd = ["extract", "--data-root", small, "--out", out, *FLAGS]
    # epoch 1 is saved and epoch 2 has begun: the signal lands in the fine-tuning
    if not interrupt(cmd, lambda: (out / TRAIN_STATE_FILE).is_file(), sig).stderr:
        resume = ["--resume"] if (out / TRAIN_STATE_FILE).is_file() and not (out / STAGE1_FILE).is_file() else []
        diffret(*cmd, *resume)
    assert_same_cache(reference, out)
    assert not (out / TRAIN_STATE_FILE).exists()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_extract_interrupted_in_the_dump_resumes_to_the_same_cache(small, reference, tmp_path, sig):
    out = tmp_path / "cache"
    cmd = ["extract", "--data-root", small, "--out", out, *FLAGS]
    shards = out / "shards"
    if not interrupt(cmd, lambda: shards.is_dir() and any(p.suffix == ".h5" for p in shards.iterdir()), sig).stderr:
        r = diffret(*cmd)  # the same command again: the finished fine-tuning and shards are kept
        assert "reusing the finished fine-tuning" in " ".join((r.stdout + r.stderr).split())
    assert_same_cache(reference, out)


@pytest.fixture(scope="module")
def syn(tmp_path_factory) -> Path:
    return synthetic_cache(tmp_path_factory.mktemp("sig-syn") / "cache", n_train=24, train_caps=2, n_test=6)


@pytest.fixture(scope="module")
def straight(syn, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sig-straight") / "gen"
    diffret("train-generator", "--cache", syn, "--out", out, *GEN)
    return out


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_train_generator_interrupted_resumes_to_the_same_weights(syn, straight, tmp_path, sig):
    out = tmp_path / "gen"
    # after the first epoch's commit record: the signal lands in its renames or in a later epoch
    interrupt(["train-generator", "--cache", syn, "--out", out, *GEN], lambda: (out / COMMIT_NAME).is_file(), sig)
    diffret("train-generator", "--cache", syn, "--out", out, "--resume")
    for name in (WEIGHTS_NAME, STATE_NAME):
        a, b = torch.load(straight / name, weights_only=False), torch.load(out / name, weights_only=False)
        for part in ("t2v", "v2t"):
            assert a[part].keys() == b[part].keys() and all(torch.equal(a[part][k], b[part][k]) for k in a[part])
    got, want = json.loads((out / META_NAME).read_text()), json.loads((straight / META_NAME).read_text())
    assert (got["epochs_done"], got["history"]) == (want["epochs_done"], want["history"]) == (4, want["history"])
