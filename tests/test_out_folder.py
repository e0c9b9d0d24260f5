"""What `extract --out` and `train-generator --out` may delete, and one writer per output folder.

diffret deletes only what it wrote: an unfinished extraction is recognised by its journal (a file
diffret wrote), never by a folder's name; `--overwrite` removes only the cache's (or the generator's)
own files and refuses, naming them, when the folder holds anything else. A folder is written by one
job at a time: a lock file names the holder, a second job is refused in one line, a stale lock (its
process is gone) is taken over."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import run_cli
from diffret.cache.layout import foreign_files
from diffret.cache.lock import LOCK_FILE, LockError, OutputLock
from diffret.cache.verify import verify_cache
from synthetic_cache import synthetic_cache
from tiny_msrvtt import demo_subset

FLAGS = ["--model", "tiny", "--pretrained", "none", "--epochs", "0", "--frames", "2", "--words", "8",
         "--fps", "uniform", "--workers", "0"]
GEN = ["--epochs", 1, "--batch-size", 8, "--candidates", 4, "--steps", 10, "--lr", "1e-3"]


@pytest.fixture(scope="module")
def tiny(demo_root, tmp_path_factory) -> Path:
    """3 training clips with one caption each, 2 test clips: an extraction of a few seconds."""
    return demo_subset(demo_root, tmp_path_factory.mktemp("tiny") / "data", n_train=3, captions=1, n_test=2)


@pytest.fixture(scope="module")
def tiny_cache(tiny, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny-cache") / "cache"
    run_cli("extract", "--data-root", tiny, "--out", out, *FLAGS)
    return out


@pytest.fixture(scope="module")
def syn(tmp_path_factory) -> Path:
    return synthetic_cache(tmp_path_factory.mktemp("syn") / "cache", n_train=12, train_caps=2)


def listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def errors(result) -> list[str]:
    return [line for line in result.output.splitlines() if line.startswith("Error:")]


def test_a_user_folder_with_a_progress_subfolder_is_never_touched(tiny, tmp_path):
    mine = tmp_path / "mine"
    (mine / "progress").mkdir(parents=True)
    (mine / "progress" / "chapter1.json").write_text("{}")  # a name the journal could have: still not ours
    (mine / "progress" / "notes.txt").write_text("precious")
    (mine / "thesis.tex").write_text("precious")
    before = listing(mine)
    for extra in ([], ["--overwrite"]):
        r = run_cli("extract", "--data-root", tiny, "--out", mine, *FLAGS, *extra, ok=False)
        assert r.exit_code == 1 and len(errors(r)) == 1, r.output
        assert "is not empty and holds no diffret cache" in r.output and "thesis.tex" in r.output
        assert listing(mine) == before
    # only a progress/ folder, nothing else: a folder name is no journal
    only = tmp_path / "only"
    (only / "progress").mkdir(parents=True)
    (only / "progress" / "run.json").write_text("[1, 2]")
    r = run_cli("extract", "--data-root", tiny, "--out", only, *FLAGS, ok=False)
    assert r.exit_code == 1 and "holds no diffret cache" in r.output
    assert listing(only) == ["progress", "progress/run.json"]


def test_overwrite_removes_only_what_diffret_wrote(tiny, tiny_cache, tmp_path):
    out = tmp_path / "cache"
    shutil.copytree(tiny_cache, out)
    (out / "notes.txt").write_text("precious")
    (out / "shards" / "figure.png").write_bytes(b"precious")
    (out / "generator.json").write_text("{}")  # a generator living in its cache folder is not the cache's
    before = listing(out)
    r = run_cli("extract", "--data-root", tiny, "--out", out, *FLAGS, "--overwrite", ok=False)
    assert r.exit_code == 1 and len(errors(r)) == 1, r.output
    line = " ".join(r.output.split())
    assert "also holds files diffret did not write" in line and "--overwrite removes only diffret's own files" in line
    for name in ("generator.json", "notes.txt", "shards/figure.png"):
        assert name in line
    assert listing(out) == before
    # A pure diffret cache (plus an old run's stray shard): --overwrite starts over.
    for name in ("notes.txt", "shards/figure.png", "generator.json"):
        (out / name).unlink()
    (out / "shards" / "video-train-00009.h5").write_bytes(b"an old shard")
    r = run_cli("extract", "--data-root", tiny, "--out", out, *FLAGS, "--overwrite")
    assert not (out / "shards" / "video-train-00009.h5").exists()
    verify_cache(out)
    assert not foreign_files(out) and not (out / LOCK_FILE).exists()


def test_train_generator_refuses_a_generator_or_foreign_files(syn, tmp_path):
    out = tmp_path / "gen"
    run_cli("train-generator", "--cache", syn, "--out", out, *GEN)
    meta = json.loads((out / "generator.json").read_text())
    before = (out / "generator.pt").read_bytes()
    # a finished generator: neither --resume nor --overwrite -> refused, untouched
    r = run_cli("train-generator", "--cache", syn, "--out", out, *GEN, "--seed", 1, ok=False)
    assert r.exit_code == 1 and len(errors(r)) == 1, r.output
    assert "already holds a generator (1 of 1 epochs done); pass --resume" in " ".join(r.output.split())
    assert (out / "generator.pt").read_bytes() == before
    r = run_cli("train-generator", "--cache", syn, "--out", out, *GEN, "--resume", "--overwrite", ok=False)
    assert r.exit_code == 1 and "pass one of them" in r.output
    # --overwrite: a new run replaces it
    run_cli("train-generator", "--cache", syn, "--out", out, *GEN, "--seed", 1, "--overwrite")
    assert json.loads((out / "generator.json").read_text())["config"]["seed"] == 1 != meta["config"]["seed"]
    # someone else's folder: refused with or without --overwrite, nothing written
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "generator.txt").write_text("precious")
    for extra in ([], ["--overwrite"]):
        r = run_cli("train-generator", "--cache", syn, "--out", mine, *GEN, *extra, ok=False)
        assert r.exit_code == 1 and "is not empty and holds no diffret generator (generator.txt)" in r.output
        assert listing(mine) == ["generator.txt"]
    # a generator beside its cache is fine; a user's file beside them is not, and stays
    cache = tmp_path / "cache"
    shutil.copytree(syn, cache)
    run_cli("train-generator", "--cache", cache, "--out", cache, *GEN)
    (cache / "notes.txt").write_text("precious")
    r = run_cli("train-generator", "--cache", cache, "--out", cache, *GEN, "--overwrite", ok=False)
    assert r.exit_code == 1 and "did not write (notes.txt)" in r.output
    # and extract --overwrite does not wipe the cache's generator either
    (cache / "notes.txt").unlink()
    before = listing(cache)
    r = run_cli("extract", "--data-root", tmp_path, "--out", cache, *FLAGS, "--overwrite", ok=False)
    assert r.exit_code == 1 and "generator.pt" in r.output and listing(cache) == before


def _hold_in_child(folder: Path) -> subprocess.Popen:
    """A separate process that takes the lock of `folder` and waits (until killed)."""
    code = ("import sys, time; from diffret.cache.lock import OutputLock; "
            "OutputLock(sys.argv[1], command='a long job').acquire(); print('locked', flush=True); time.sleep(600)")
    child = subprocess.Popen([sys.executable, "-c", code, str(folder)], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "locked"  # blocks until the child holds it
    return child


def test_one_writer_per_folder(tiny, syn, tmp_path):
    host = socket.gethostname()
    # extract: another process holds the folder (same settings or not): one line naming it
    out = tmp_path / "cache"
    child = _hold_in_child(out)
    try:
        for extra in ([], ["--overwrite"]):
            r = run_cli("extract", "--data-root", tiny, "--out", out, *FLAGS, *extra, ok=False)
            assert r.exit_code == 1 and len(errors(r)) == 1, r.output
            line = " ".join(r.output.split())
            assert f"is in use by another diffret job (host {host}, pid {child.pid}, command: a long job)" in line
            assert listing(out) == [LOCK_FILE]
    finally:
        child.kill()
        child.wait()
    # its process is gone, its lock file is left: stale, taken over
    r = run_cli("extract", "--data-root", tiny, "--out", out, *FLAGS)
    assert f"taking over the stale lock of {out} (pid {child.pid} is not running)" in " ".join(r.output.split())
    verify_cache(out)
    assert not (out / LOCK_FILE).exists()

    # train-generator: a lock held in this process, with a made-up command
    gen = tmp_path / "gen"
    with OutputLock(gen, command="diffret train-generator --out gen"):
        r = run_cli("train-generator", "--cache", syn, "--out", gen, *GEN, ok=False)
        assert r.exit_code == 1 and len(errors(r)) == 1, r.output
        assert (f"(host {host}, pid {os.getpid()}, command: diffret train-generator --out gen)"
                in " ".join(r.output.split()))
        assert listing(gen) == [LOCK_FILE]
    assert not gen.exists()  # the lock made the folder, and nothing else was written: it is gone again

    # a stale lock file of a dead process on this host
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    gen.mkdir()
    (gen / LOCK_FILE).write_text(json.dumps({"host": host, "pid": int(dead.stdout), "command": "killed"}))
    r = run_cli("train-generator", "--cache", syn, "--out", gen, *GEN)
    assert "taking over the stale lock" in " ".join(r.output.split())
    assert (gen / "generator.pt").is_file() and not (gen / LOCK_FILE).exists()


def test_a_lock_of_another_host_is_not_taken_over(tmp_path):
    (tmp_path / LOCK_FILE).write_text(json.dumps({"host": "elsewhere.invalid", "pid": 1, "command": "job"}))
    with pytest.raises(LockError, match=r"another host \(host elsewhere.invalid, pid 1, command: job\).*delete"):
        OutputLock(tmp_path).acquire()
    with OutputLock(tmp_path / "new") as lock:  # a lock is released on an exception too
        with pytest.raises(LockError, match="in use by another diffret job"):
            OutputLock(tmp_path / "new").acquire()
        assert json.loads(lock.path.read_text())["pid"] == os.getpid()
    assert not (tmp_path / "new").exists()


def test_a_killed_jobs_forked_children_do_not_keep_its_lock(tmp_path):
    """A job that forked (its decoding helper, DataLoader workers) and was then killed: its children may
    outlive it for a moment (PR_SET_PDEATHSIG is asynchronous, a DataLoader worker checks its parent
    every 5 s) and must not hold the folder's flock meanwhile: the same command run again at once
    takes the stale lock over instead of saying the folder is in use."""
    import signal
    import time

    folder, child_pid = tmp_path / "out", tmp_path / "child.pid"
    pid = os.fork()
    if pid == 0:  # the job: takes the lock, forks a long-lived child, dies without any clean-up
        try:
            OutputLock(folder, command="the killed job").acquire()
            if os.fork() == 0:
                child_pid.write_text(str(os.getpid()))
                time.sleep(120)
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    deadline = time.monotonic() + 60
    while not child_pid.is_file() or not child_pid.read_text():  # the job's child is running
        assert time.monotonic() < deadline
        time.sleep(0.01)
    told = []
    try:
        with OutputLock(folder, log=told.append):
            assert told == [f"taking over the stale lock of {folder} (pid {pid} is not running)"]
    finally:
        os.kill(int(child_pid.read_text()), signal.SIGKILL)
