"""`diffret extract` resumes only onto the same inputs, re-runs safely, and refuses a split with no
readable video before any work (issue 12, items 6 and 8)."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from conftest import run_cli
from diffret.cache.lock import LOCK_FILE
from diffret.cache.manifest import MANIFEST_NAME
from diffret.extract.annotations import load_msrvtt
from test_extract_resume import FLAGS, extract_in_child
from tiny_msrvtt import write_msrvtt

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]  # end-to-end extractions (tiny ones: about 30 s in all)

EPOCHS0 = ["--epochs", "0"]  # after FLAGS: the last --epochs wins


@pytest.fixture()
def data(demo_root, tmp_path) -> Path:
    """4 training clips with 2 captions each, 2 test clips (shards of 3 rows: several per split)."""
    ann = load_msrvtt(demo_root)
    train = {v: [c.text for c in ann.split("train") if c.video_id == v][:2] for v in ann.video_ids("train")[:4]}
    test = [(c.caption_id, c.video_id, c.text) for c in ann.split("test")[:2]]
    videos = {v: ann.videos[v] for v in list(train) + [v for _, v, _ in test]}
    return write_msrvtt(tmp_path / "data", train, test, videos)


def extract(data, out, *extra, ok=False):
    return run_cli("extract", "--data-root", data, "--out", out, *FLAGS, *EPOCHS0, *extra, ok=ok)


def snapshot(out: Path) -> dict:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and p.name != LOCK_FILE}


def one_error_line(r) -> str:
    lines = [ln for ln in r.output.splitlines() if ln.startswith("Error:")]
    assert r.exit_code == 1 and len(lines) == 1, r.output
    return lines[0]


def test_a_resume_onto_an_edited_caption_is_refused(data, tmp_path):
    out = tmp_path / "cache"
    extract_in_child(data, out, fault="shard:video-train-00000.h5", extra=EPOCHS0)
    before = snapshot(out)
    ann_file = data / "MSRVTT_data.json"
    doc = json.loads(ann_file.read_text())
    doc["sentences"][0]["caption"] += " (edited)"
    ann_file.write_text(json.dumps(doc))
    line = one_error_line(extract(data, out))
    assert "unfinished extraction of other inputs" in line and f"the annotation file {ann_file} changed" in line
    assert snapshot(out) == before  # nothing lost
    extract(data, out, "--overwrite", ok=True)  # --overwrite starts over with the new caption
    assert (out / MANIFEST_NAME).is_file()


def test_a_resume_onto_a_touched_video_is_refused(data, tmp_path):
    out = tmp_path / "cache"
    extract_in_child(data, out, fault="shard:video-train-00000.h5", extra=EPOCHS0)
    before = snapshot(out)
    video = sorted((data / "videos").glob("*.mp4"))[-1]
    st = video.stat()
    os.utime(video, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    line = one_error_line(extract(data, out))
    assert "unfinished extraction of other inputs" in line and f"the video {video} changed" in line
    assert snapshot(out) == before
    os.utime(video, ns=(st.st_atime_ns, st.st_mtime_ns))  # put back: the resume goes on
    extract(data, out, ok=True)
    assert (out / MANIFEST_NAME).is_file()


def test_a_failed_run_that_did_no_work_does_not_block_the_corrected_command(data, tmp_path):
    out = tmp_path / "cache"
    r = extract(data, out, "--model", "nosuch")
    assert r.exit_code == 1, r.output
    r = extract(data, out)
    assert r.exit_code == 0, r.output
    assert "other settings" not in r.output and (out / MANIFEST_NAME).is_file()


def test_the_same_command_on_a_finished_cache_is_a_no_op(data, tmp_path):
    out = tmp_path / "cache"
    extract(data, out, ok=True)
    before = snapshot(out)
    r = extract(data, out)
    assert r.exit_code == 0 and "already complete" in " ".join(r.output.split()), r.output
    assert snapshot(out) == before
    # other settings, or an edited caption, are still refused (--overwrite rebuilds)
    assert "complete cache made with other settings (frames was 4, now 5)" in one_error_line(
        extract(data, out, "--frames", "5"))
    ann_file = data / "MSRVTT_data.json"
    doc = json.loads(ann_file.read_text())
    doc["sentences"][0]["caption"] += " (edited)"
    ann_file.write_text(json.dumps(doc))
    assert "complete cache of other inputs (caption" in one_error_line(extract(data, out))
    assert snapshot(out) == before


def test_a_missing_video_folder_is_one_line_before_fine_tuning(data, tmp_path):
    out = tmp_path / "cache"
    r = run_cli("extract", "--data-root", data, "--out", out, *FLAGS, "--video-dir", "/nonexistent", ok=False)
    line = one_error_line(r)
    assert "none of the 4 train videos exists" in line and "--video-dir" in line
    assert "epoch" not in r.output.lower() and not out.exists()  # no fine-tuning, nothing written


def test_a_split_whose_videos_are_all_missing_is_named_before_any_work(data, tmp_path):
    out = tmp_path / "cache"
    ann = load_msrvtt(data)
    for v in ann.video_ids("test"):
        ann.videos[v].unlink()
    r = run_cli("extract", "--data-root", data, "--out", out, *FLAGS, ok=False)
    assert "none of the 2 test videos exists" in one_error_line(r)
    assert not out.exists()


def test_a_split_whose_videos_all_fail_to_decode_points_at_failures(data, tmp_path, monkeypatch):
    """Videos that exist and open but whose frames do not decode: found during the dump, one line
    naming the split and failures.parquet (and the same on a re-run)."""
    import diffret.extract.data as data_mod
    from diffret.extract.video import VideoDecodeError

    test_paths = {str(load_msrvtt(data).videos[v]) for v in load_msrvtt(data).video_ids("test")}
    name = next(n for n in ("read_frames_timed", "read_frames") if hasattr(data_mod, n))  # (--workers 0: in-process)
    real = getattr(data_mod, name)

    def failing(path, *a, **k):
        if str(path) in test_paths:
            raise VideoDecodeError(Path(path), "cannot decode frames (test)")
        return real(path, *a, **k)

    monkeypatch.setattr(data_mod, name, failing)
    out = tmp_path / "cache"
    for _ in range(2):
        line = one_error_line(extract(data, out))
        assert f"none of the 2 test videos could be decoded; the reasons are in {out / 'failures.parquet'}" in line
        assert (out / "failures.parquet").is_file() and not (out / MANIFEST_NAME).exists()
    shutil.rmtree(out)
