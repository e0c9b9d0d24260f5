"""Shared fixtures: one tiny demo set, one cache and one generator per test session, made
through the real `diffret` commands (click's test runner, same process)."""
from __future__ import annotations

import json
import os

import pytest
import torch
from click.testing import CliRunner

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no test may reach a model hub

from diffret.pipeline.cli import main  # noqa: E402

TINY_EXTRACT = ["--model", "tiny", "--pretrained", "none", "--epochs", "1", "--batch-size", "16",
                "--lr", "1e-3", "--clip-lr-scale", "1", "--fps", "uniform", "--workers", "0"]


def run_cli(*args: str, ok: bool = True):
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    if ok and result.exit_code != 0:
        raise AssertionError(f"diffret {' '.join(map(str, args))} failed ({result.exit_code}):\n{result.output}")
    return result


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo") / "data"
    run_cli("demo-data", root, "--train", 24, "--test", 12, "--workers", 1)
    return root


@pytest.fixture(scope="session")
def cache_dir(demo_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("cache") / "cache"
    run_cli("extract", "--dataset", "msrvtt", "--data-root", demo_root, "--out", out, *TINY_EXTRACT)
    return out


@pytest.fixture(scope="session")
def generator_dir(cache_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("gen") / "generator"
    run_cli("train-generator", "--cache", cache_dir, "--out", out, "--epochs", 2, "--batch-size", 16,
            "--candidates", 8, "--steps", 10, "--lr", "1e-3")
    return out


def read_json(path):
    return json.loads(open(path).read())


@pytest.fixture(scope="module")
def one_thread():
    """torch on one thread for the module (modules opt in with usefixtures): tiny models run several
    times faster than on two contended threads, and forked children match it bit for bit."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
