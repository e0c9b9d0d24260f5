"""An epoch's generator files are one atomic commit (generator/checkpoint.py): a kill at any file
boundary of the write window leaves the previous epoch or the new one, never a mix; readers take
the committed files, `--resume` reaches exactly the uninterrupted result, a folder that mixes two
epochs is refused, an unfinished generator is evaluated with a warning (and says so in the JSON),
and the NaN-loss message advises --resume only when there is an epoch to resume from."""
from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import run_cli
from synthetic_cache import synthetic_cache

from diffret.generator import checkpoint, trainer
from diffret.generator.checkpoint import (COMMIT_NAME, META_NAME, STATE_NAME, WEIGHTS_NAME, GeneratorError,
                                         load_generator)

FAST = ["--batch-size", 8, "--candidates", 4, "--steps", 10, "--lr", "1e-3", "--epochs", 2]  # 3 steps an epoch
FILES = (WEIGHTS_NAME, META_NAME, STATE_NAME)


class Killed(BaseException):
    """Raised at a commit boundary: nothing after it runs, as after a SIGKILL (no `except Exception`)."""


@pytest.fixture(scope="module")
def syn(tmp_path_factory):
    return synthetic_cache(tmp_path_factory.mktemp("syn") / "cache", n_train=12, train_caps=2, n_test=6)


def _nan_at_call(monkeypatch, n):
    """The n-th training step's loss becomes NaN (3 steps an epoch: 5 is epoch 2 step 2)."""
    real, calls = trainer.batch_loss, {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if calls["n"] == n else loss

    monkeypatch.setattr(trainer, "batch_loss", flaky)


@pytest.fixture(scope="module")
def straight(syn, tmp_path_factory):
    """An uninterrupted 2-epoch run and the same run stopped in epoch 2 (a NaN loss): (folder, commit
    boundary labels in order, {epochs done: its files' bytes}, the stopped run's folder)."""
    out, half = tmp_path_factory.mktemp("straight") / "gen", tmp_path_factory.mktemp("half") / "gen"
    labels = []
    mp = pytest.MonkeyPatch()
    mp.setattr(checkpoint, "_boundary", labels.append)
    try:
        run_cli("train-generator", "--cache", syn, "--out", out, *FAST)
        _nan_at_call(mp, 5)
        run_cli("train-generator", "--cache", syn, "--out", half, *FAST, ok=False)
    finally:
        mp.undo()
    snapshots = {2: {n: (out / n).read_bytes() for n in FILES}, 1: {n: (half / n).read_bytes() for n in FILES}}
    assert json.loads(snapshots[1][META_NAME])["epochs_done"] == 1
    return out, labels, snapshots, half


def _tensors(data: bytes) -> dict:
    state = torch.load(io.BytesIO(data), weights_only=False)
    return {f"{d}.{k}": v for d in ("t2v", "v2t") for k, v in state[d].items()}


def _same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _generator_weights(gen) -> dict:
    return {f"{d}.{k}": v for d, m in (("t2v", gen.t2v), ("v2t", gen.v2t)) for k, v in m.state_dict().items()}


def _check_resumes_to_straight(syn, out, straight_out):
    """`--resume` (or, when nothing was committed, the same command again) ends exactly as the straight run."""
    if (out / COMMIT_NAME).is_file():
        r = run_cli("train-generator", "--cache", syn, "--out", out, "--resume")
    else:
        r = run_cli("train-generator", "--cache", syn, "--out", out, "--resume", ok=False)
        assert r.exit_code == 1 and "nothing to resume" in r.output
        # killed before its first commit: only pending copies, no generator, so the same command again
        run_cli("train-generator", "--cache", syn, "--out", out, *FAST)
    for name in (WEIGHTS_NAME, STATE_NAME):
        a, b = torch.load(straight_out / name, weights_only=False), torch.load(out / name, weights_only=False)
        for part in ("t2v", "v2t"):
            assert _same_weights(a[part], b[part]), (name, part)
    got, want = json.loads((out / META_NAME).read_text()), json.loads((straight_out / META_NAME).read_text())
    assert (got["epochs_done"], got["history"]) == (want["epochs_done"], want["history"]) == (2, want["history"])
    assert not [p.name for p in out.iterdir() if p.name.endswith(".pending") or ".tmp" in p.name]
    return r


@pytest.mark.slow
def test_a_kill_at_every_boundary_of_the_commit_resumes_to_the_uninterrupted_run(syn, straight, tmp_path, monkeypatch):
    straight_out, labels, snapshots, _ = straight
    per_commit = [f"pending {n}" for n in FILES] + [f"wrote {COMMIT_NAME}"] + [f"renamed {n}" for n in FILES]
    assert labels[:len(per_commit) * 2] == per_commit * 2  # the straight run's two commits (then the stopped run's)
    for i, label in enumerate(labels[:len(per_commit) * 2]):
        out = tmp_path / f"kill{i}"
        calls = {"n": 0}

        def stop(lbl, at=i):
            calls["n"] += 1
            if calls["n"] - 1 == at:
                raise Killed(lbl)

        monkeypatch.setattr(checkpoint, "_boundary", stop)
        with pytest.raises(Killed):
            run_cli("train-generator", "--cache", syn, "--out", out, *FAST)
        monkeypatch.undo()
        committed = i // len(per_commit) + (i % len(per_commit) >= len(per_commit) - len(FILES) - 1)  # epochs
        # a reader sees exactly the last complete commit (its files, wherever the renames stopped)
        if committed == 0:
            with pytest.raises(GeneratorError, match="holds no trained generator"):
                load_generator(out)
        else:
            gen = load_generator(out)
            assert gen.meta["epochs_done"] == committed, label
            assert _same_weights(_generator_weights(gen), _tensors(snapshots[committed][WEIGHTS_NAME])), label
        _check_resumes_to_straight(syn, out, straight_out)


@pytest.mark.slow
def test_a_sigkill_between_the_renames_of_the_last_epoch_resumes_and_evaluates(syn, straight, tmp_path):
    """The reported window: killed (os._exit, no clean-up at all) after generator.pt of epoch 2 was
    renamed, before train_state.pt was: today resume failed or kept the epoch-1 weights."""
    straight_out, _, snapshots, _ = straight
    out = tmp_path / "gen"
    script = textwrap.dedent(f"""
        import os, sys
        from diffret.generator import checkpoint
        seen = []
        def stop(label):
            seen.append(label)
            if seen.count("renamed {WEIGHTS_NAME}") == 2:
                os._exit(9)
        checkpoint._boundary = stop
        from diffret.pipeline.cli import main
        main(sys.argv[1:])
    """)
    args = ["train-generator", "--cache", str(syn), "--out", str(out), *map(str, FAST)]
    proc = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 9, proc.stderr[-2000:]
    assert (out / f".{STATE_NAME}.pending").is_file()  # the kill did land inside the renames
    gen = load_generator(out)  # the epoch-2 commit, though train_state.pt on disk is still epoch 1's
    assert gen.meta["epochs_done"] == 2 and _same_weights(_generator_weights(gen), _tensors(snapshots[2][WEIGHTS_NAME]))
    r = run_cli("evaluate", "--cache", syn, "--generator", out, "--steps", 2, "--top-k", 2)
    assert "is unfinished" not in r.output
    r = _check_resumes_to_straight(syn, out, straight_out)
    assert "already has 2 epochs" in " ".join(r.output.split())


def test_a_folder_that_mixes_two_epochs_is_refused(syn, straight, tmp_path):
    straight_out, _, snapshots, _ = straight
    # generator.pt and generator.json of epoch 1 put back beside epoch 2's commit record and train state
    mixed = tmp_path / "mixed"
    shutil.copytree(straight_out, mixed)
    for name in (WEIGHTS_NAME, META_NAME):
        (mixed / name).write_bytes(snapshots[1][name])
    with pytest.raises(GeneratorError, match="mixes files of two epochs") as e:
        load_generator(mixed)
    assert "\n" not in str(e.value)
    r = run_cli("evaluate", "--cache", syn, "--generator", mixed, "--steps", 2, "--top-k", 2, ok=False)
    assert r.exit_code == 1 and "mixes files of two epochs" in r.output
    r = run_cli("train-generator", "--cache", syn, "--out", mixed, "--resume", ok=False)
    assert r.exit_code == 1 and "mixes files of two epochs" in r.output
    # a train state of another epoch than the commit's: never resumed from
    stale = tmp_path / "stale"
    shutil.copytree(straight_out, stale)
    (stale / STATE_NAME).write_bytes(snapshots[1][STATE_NAME])
    r = run_cli("train-generator", "--cache", syn, "--out", stale, "--resume", ok=False)
    assert r.exit_code == 1 and f"{STATE_NAME} is not the file {COMMIT_NAME} records for epoch 2" in r.output
    # a folder of a diffret without commit records, torn as reported (train_state.pt newer than generator.pt)
    old = tmp_path / "old"
    shutil.copytree(straight_out, old)
    (old / COMMIT_NAME).unlink()
    for name in (WEIGHTS_NAME, META_NAME):
        (old / name).write_bytes(snapshots[1][name])
    r = run_cli("train-generator", "--cache", syn, "--out", old, "--resume", ok=False)
    assert r.exit_code == 1 and "interrupted while writing an epoch" in r.output
    assert (old / WEIGHTS_NAME).read_bytes() == snapshots[1][WEIGHTS_NAME]  # nothing changed


def test_evaluating_an_unfinished_generator_warns_and_says_so_in_the_json(syn, straight, tmp_path):
    straight_out, _, _, half = straight  # half: a run stopped after its first epoch of 2
    r = run_cli("evaluate", "--cache", syn, "--generator", half, "--steps", 2, "--top-k", 2, "--json",
                tmp_path / "half.json")
    out = " ".join(r.output.split())
    assert "warning: the generator in" in out and "is unfinished: 1 of its 2 epochs were trained" in out
    report = json.loads((tmp_path / "half.json").read_text())
    assert (report["unfinished"], report["epochs_done"], report["epochs"]) == (True, 1, 2)
    r = run_cli("evaluate", "--cache", syn, "--generator", straight_out, "--steps", 2, "--top-k", 2, "--json",
                tmp_path / "full.json")
    assert "is unfinished" not in r.output
    report = json.loads((tmp_path / "full.json").read_text())
    assert (report["unfinished"], report["epochs_done"], report["epochs"]) == (False, 2, 2)


def test_the_nan_message_advises_resume_only_when_an_epoch_was_saved(syn, tmp_path, monkeypatch):
    _nan_at_call(monkeypatch, 2)  # epoch 1 step 2: nothing was saved
    r = run_cli("train-generator", "--cache", syn, "--out", tmp_path / "a", *FAST, ok=False)
    error = [line for line in r.output.splitlines() if line.startswith("Error:")]
    assert r.exit_code == 1 and len(error) == 1 and "nan at epoch 1 step 2" in error[0]
    assert "--resume" not in r.output and "nothing to resume" in error[0]
    assert not (tmp_path / "a" / COMMIT_NAME).exists()
    _nan_at_call(monkeypatch, 5)  # epoch 2 step 2: epoch 1 is committed
    r = run_cli("train-generator", "--cache", syn, "--out", tmp_path / "b", *FAST, ok=False)
    error = " ".join(r.output.split())
    assert r.exit_code == 1 and "nan at epoch 2 step 2" in error and "continue with --resume" in error
    assert json.loads((tmp_path / "b" / COMMIT_NAME).read_text())["epochs_done"] == 1
