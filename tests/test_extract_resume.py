"""Kill-safe, resumable `diffret extract`: killed (SIGKILL) at several points and out of disk
space once, the same command resumes and gives the same cache as an uninterrupted run; what
--out may hold (a complete cache, another run's remains, someone else's files) is decided
before any work."""
from __future__ import annotations

import errno
import os
import signal
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

import h5py
import pytest
import torch

from conftest import run_cli
from diffret.cache.journal import FAULT_ENV, PROGRESS_DIR
from diffret.cache.lock import LOCK_FILE
from diffret.cache.manifest import MANIFEST_NAME
from diffret.cache.verify import verify_cache
from test_cache_integrity import assert_same_cache
from tiny_msrvtt import demo_subset

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

FLAGS = ["--model", "tiny", "--pretrained", "none", "--epochs", "1", "--batch-size", "4", "--lr", "1e-3",
         "--frames", "4", "--words", "16", "--fps", "uniform", "--workers", "0", "--shard-rows", "3"]


@pytest.fixture(scope="module")
def small(demo_root, tmp_path_factory) -> Path:
    """8 training clips with 2 captions each, 4 test clips: 3 + 6 + 2 + 2 shards of 3 rows."""
    return demo_subset(demo_root, tmp_path_factory.mktemp("small") / "data", n_train=8, captions=2, n_test=4)


@pytest.fixture(scope="module")
def reference(small, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "cache"
    run_cli("extract", "--data-root", small, "--out", out, *FLAGS)
    return out


def extract_in_child(small, out, fault: str | None = None, kill_when: str | None = None, extra=()) -> None:
    """Run `diffret extract` in a forked child process that gets SIGKILLed: by itself at the fault
    point `fault`, or by this process as soon as the file `kill_when` (relative to out) exists."""
    err = out.parent / "child-error.txt"
    pid = os.fork()
    if pid == 0:  # the child: one torch thread (as in DataLoader workers), run, never return
        code = 0
        try:
            torch.set_num_threads(1)
            if fault:
                os.environ[FAULT_ENV] = fault
            r = run_cli("extract", "--data-root", small, "--out", out, *FLAGS, *extra, ok=False)
            err.write_text(f"finished with exit code {r.exit_code}:\n{r.output}")
        except BaseException:  # noqa: BLE001
            err.write_text(traceback.format_exc())
            code = 1
        finally:
            os._exit(code)
    done = (0, 0)
    if kill_when:
        while not (out / kill_when).exists() and (done := os.waitpid(pid, os.WNOHANG)) == (0, 0):
            time.sleep(0.001)
        if done == (0, 0):  # (a child that ended by itself is reaped already: no kill of a reused pid)
            os.kill(pid, signal.SIGKILL)
    _, status = done if done != (0, 0) else os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, err.read_text() if err.exists() else status


def assert_nothing_half_written(out: Path) -> None:
    """No manifest yet, and every visible shard is a whole HDF5 file."""
    assert not (out / MANIFEST_NAME).exists()
    for p in (out / "shards").glob("*.h5"):
        with h5py.File(p, "r") as f:
            assert f.attrs["rows"] == len(f[next(iter(f))])


@pytest.mark.slow
def test_killed_and_out_of_space_runs_resume_to_the_same_cache(small, reference, tmp_path, monkeypatch):
    out = tmp_path / "cache"
    # 1. the video shard is renamed into place, its journal entry not yet written
    extract_in_child(small, out, fault="shard:video-train-00001.h5")
    assert (out / "stage1.pt").is_file() and (out / "shards/video-train-00001.h5").is_file()
    assert not (out / PROGRESS_DIR / "video-train-00001.json").exists()
    assert_nothing_half_written(out)
    # 2. in the middle of the captions, right after a shard's journal entry
    extract_in_child(small, out, fault="journal:text-train-00002.h5")
    assert_nothing_half_written(out)
    # 3. the disk fills up on the second shard this run writes: one clear line, exit 1
    import diffret.cache.writer as writer_mod

    real, calls = writer_mod.write_shard, []

    def disk_full(*args, **kwargs):
        calls.append(args[0])
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(writer_mod, "write_shard", disk_full)
    r = run_cli("extract", "--data-root", small, "--out", out, *FLAGS, ok=False)
    errors = [line for line in r.output.splitlines() if line.startswith("Error:")]
    assert r.exit_code == 1 and len(errors) == 1, r.output
    assert errors[0] == ("Error: cannot write shard shards/text-train-00004.h5: No space left on device; finished "
                         "shards are kept, fix the disk and re-run the same command to resume")
    assert not (out / "shards/text-train-00004.h5").exists()
    monkeypatch.undo()
    assert_nothing_half_written(out)
    # 4. killed from outside, whenever the next caption shard is done
    extract_in_child(small, out, kill_when=f"{PROGRESS_DIR}/text-train-00004.json")
    assert_nothing_half_written(out)
    # 5. after the index and failures.parquet, before the manifest
    extract_in_child(small, out, fault="close")
    assert (out / "captions.parquet").is_file()
    assert_nothing_half_written(out)
    # 6. the same command finishes the job
    r = run_cli("extract", "--data-root", small, "--out", out, *FLAGS)
    text = " ".join(r.output.split())
    assert "resuming the unfinished extraction" in text and "reusing the finished fine-tuning" in text
    assert "resuming: 13 finished shards kept" in text, r.output
    assert_same_cache(reference, out)  # same tensors, same index, same shard bytes (sha256)
    verify_cache(out)
    assert not (out / PROGRESS_DIR).exists() and not [p for p in out.rglob(".*")]


@pytest.mark.slow
def test_what_out_may_hold(small, reference, tmp_path, monkeypatch):
    # A complete cache: the same command is a no-op (exit 0); other settings are refused.
    r = run_cli("extract", "--data-root", small, "--out", reference, *FLAGS, ok=False)
    assert r.exit_code == 0 and "already complete" in " ".join(r.output.split()), r.output
    r = run_cli("extract", "--data-root", small, "--out", reference, *FLAGS, "--frames", "5", ok=False)
    assert r.exit_code == 1 and "already holds a complete cache made with other settings (frames was 4" in r.output

    # Someone else's files are never touched, with or without --overwrite.
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    for extra in ([], ["--overwrite"]):
        r = run_cli("extract", "--data-root", small, "--out", tmp_path / "mine", *FLAGS, *extra, ok=False)
        assert r.exit_code == 1 and "is not empty and holds no diffret cache" in r.output
    assert os.listdir(tmp_path / "mine") == ["thesis.tex"]

    # An unfinished run is resumed only with the same settings, checked before any work.
    out = tmp_path / "cut"
    extract_in_child(small, out, fault="shard:video-train-00000.h5")
    before = sorted(p.name for p in out.rglob("*"))
    r = run_cli("extract", "--data-root", small, "--out", out, *FLAGS, "--frames", "5", ok=False)
    assert r.exit_code == 1 and "holds an unfinished extraction with other settings (frames was 4, now 5)" in r.output
    # (the killed run's lock file is stale: the refused run took it over and removed it on exit)
    assert sorted(p.name for p in out.rglob("*")) == [n for n in before if n != LOCK_FILE]
    # --overwrite starts over: the old run's files are gone (this run is killed at its first shard)
    (out / "shards/video-train-00009.h5").write_bytes(b"an old shard")
    extract_in_child(small, out, fault="shard:video-train-00000.h5", extra=["--overwrite"])
    assert sorted(p.name for p in out.rglob("*")) == before

    # An output folder that cannot be written: one line, before any work.
    import diffret.extract.dump as dump_mod

    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(dump_mod, "tempfile", SimpleNamespace(mkstemp=denied))
    r = run_cli("extract", "--data-root", small, "--out", tmp_path / "ro", *FLAGS, ok=False)
    assert r.exit_code == 1 and f"Error: cannot write to {tmp_path / 'ro'}: Permission denied" in r.output


class FakeTextModel:
    """encode_text as a pure function of the token ids (enough to test the dump's windows)."""

    def encode_text(self, tokens):
        t = tokens.float()
        return {"sentence": t[:, :2] * 0.5, "words": t[:, :, None].expand(-1, -1, 2) / 7,
                "word_mask": tokens > 0, "word_logits": t / 3}


def test_a_resume_redoes_the_windows_whose_inputs_changed(tmp_path):
    from diffret.cache.manifest import Manifest
    from diffret.cache.store import CacheWriter
    from diffret.extract.dump import dump_texts
    from test_cache_integrity import assert_same_cache

    def run(root, ids, stop_after=None):
        m = Manifest(width=2, n_words=4, n_frames=1, model={"fingerprint": "f"}, extract_config={})
        logs = []
        w = CacheWriter(root, m, shard_rows=3, resume=True, log=logs.append)
        if stop_after is not None:  # an interrupted run: only the first windows, no close()
            ids = ids[: 3 * stop_after]
        tokens = torch.tensor([[1, int(i[1:]) + 2, 3, 0] for i in ids])
        dump_texts(FakeTextModel(), w, "train", ids, ["v"] * len(ids), [f"text {i}" for i in ids], tokens,
                   torch.device("cpu"), batch_size=2, amp=False)
        if stop_after is None:
            w.close()
        return logs

    before = [f"c{i}" for i in range(8)]
    after = before[:3] + ["c30", "c31"] + before[5:]  # window 1 changed
    run(tmp_path / "ref", after)
    run(tmp_path / "c", before, stop_after=2)
    logs = run(tmp_path / "c", after)
    assert logs == ["resuming: 2 finished shards kept",
                    "the train captions changed since the interrupted run: redoing them from shard 1"]
    assert_same_cache(tmp_path / "ref", tmp_path / "c")
