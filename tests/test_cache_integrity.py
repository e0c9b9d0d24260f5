"""A cache you can trust: verify / info, refusing mismatches, resumable and out-of-space-safe
writing, and the h5py + pyarrow reader of docs/cache.md (no extraction here: synthetic caches)."""
from __future__ import annotations

import errno
import json
import re
from pathlib import Path

import h5py
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import run_cli
from diffret.cache.info import cache_info
from diffret.cache.journal import PROGRESS_DIR, Journal
from diffret.cache.manifest import (
    MANIFEST_NAME, SCHEMA_VERSION, CacheError, Manifest, check_compatible, read_manifest, sha256_file,
)
from diffret.cache.store import CAPTIONS_FILE, CacheReader, CacheWriter
from diffret.cache.verify import verify_cache
from diffret.cache.wti import wti_similarity

D, L, F = 8, 5, 4
ROOT = Path(__file__).resolve().parents[1]


def manifest(fp="abc123") -> Manifest:
    return Manifest(width=D, n_words=L, n_frames=F, model={"name": "tiny", "pretrained": "", "fingerprint": fp},
                    extract_config={}, dataset="toy")


def prefix_mask(rng, n, slots):
    return np.arange(slots)[None, :] < rng.integers(1, slots + 1, n)[:, None]


def rows(split, lo, hi, seed=0):
    """Deterministic text and video rows lo..hi-1 of a split (the same rows on every call)."""
    rng = np.random.default_rng([seed, lo, hi, len(split)])
    n = hi - lo
    text = dict(caption_ids=[f"{split}-c{i}" for i in range(lo, hi)], video_ids=[f"{split}-v{i}" for i in range(lo, hi)],
                captions=[f"caption {i}" for i in range(lo, hi)], sentence=rng.standard_normal((n, D)),
                words=rng.standard_normal((n, L, D)), word_mask=prefix_mask(rng, n, L),
                word_logits=rng.standard_normal((n, L)))
    video = dict(video_ids=[f"{split}-v{i}" for i in range(lo, hi)], paths=[f"/v/{i}.mp4" for i in range(lo, hi)],
                 frames=rng.standard_normal((n, F, D)), frame_mask=prefix_mask(rng, n, F),
                 frame_logits=rng.standard_normal((n, F)))
    return text, video


def write(root, n=7, size=3, writer=None, windows=None):
    """A cache of `n` captions and videos per split, shards of `size` rows, one window per shard."""
    w = writer or CacheWriter(root, manifest(), shard_rows=size)
    for split in ("train", "test"):
        for kind in ("video", "text"):
            for k in range(w.completed(kind, split), -(-n // size)):
                if windows is not None and windows <= 0:
                    return w
                text, video = rows(split, k * size, min(n, (k + 1) * size))
                w.add_text(split, **text) if kind == "text" else w.add_video(split, **video)
                w.end_shard(kind, split)
                windows = None if windows is None else windows - 1
    w.close()
    return w


def assert_same_cache(a, b):
    ra, rb = CacheReader(a), CacheReader(b)
    assert ra.manifest.splits == rb.manifest.splits
    assert [(s.file, s.rows, s.sha256) for s in ra.manifest.shards] == [(s.file, s.rows, s.sha256) for s in rb.manifest.shards]
    for split in ra.splits:
        for kind in ("text", "video"):
            x, y = getattr(ra, kind)(split), getattr(rb, kind)(split)
            for k, v in vars(x).items():
                if isinstance(v, np.ndarray):
                    np.testing.assert_array_equal(v, getattr(y, k))
                else:
                    assert v == getattr(y, k)
    assert ra.index("text").equals(rb.index("text")) and ra.index("video").equals(rb.index("video"))


def one_line(e) -> str:
    msg = str(e.value)
    assert msg and "\n" not in msg
    return msg


# --------------------------------------------------------------------------- verify


def flip_byte_in(path: Path, dataset: str) -> None:
    with h5py.File(path, "r") as f:
        offset = f[dataset].id.get_chunk_info(0).byte_offset
    data = bytearray(path.read_bytes())
    data[offset + 5] ^= 0xFF
    path.write_bytes(bytes(data))


def test_verify_passes_and_catches_a_flipped_byte(tmp_path):
    write(tmp_path / "c")
    report = verify_cache(tmp_path / "c")
    assert report["shards"] == 4 * 3 and report["splits"]["train"] == {"captions": 7, "videos": 7}
    assert report["notes"] == []
    r = run_cli("cache", "verify", tmp_path / "c")
    assert "OK" in r.output

    flip_byte_in(tmp_path / "c/shards/video-train-00001.h5", "frames")
    with pytest.raises(CacheError, match=r"shard shards/video-train-00001\.h5 is corrupted") as e:
        verify_cache(tmp_path / "c")
    one_line(e)
    r = run_cli("cache", "verify", tmp_path / "c", ok=False)
    errors = [line for line in r.output.splitlines() if line.startswith("Error:")]
    assert r.exit_code == 1 and len(errors) == 1 and "video-train-00001.h5 is corrupted" in errors[0], r.output


def _rewrite_index(root, name, change):
    table = pq.read_table(root / name).to_pylist()
    change(table)
    pq.write_table(pa.Table.from_pylist(table, schema=pq.read_schema(root / name)), root / name)


def _edit_manifest(root, change):
    d = json.loads((root / MANIFEST_NAME).read_text())
    change(d)
    (root / MANIFEST_NAME).write_text(json.dumps(d))


def _nan_shard(root):  # a shard holding NaN whose recorded checksum was (wrongly) updated to match
    path = root / "shards/text-test-00000.h5"
    with h5py.File(path, "r+") as f:
        f["sentence"][0, 0] = np.nan
    _edit_manifest(root, lambda d: [s.update(sha256=sha256_file(path)) for s in d["shards"] if s["file"].endswith(path.name)])


@pytest.mark.parametrize("damage, message", [
    (lambda r: (r / "shards/text-train-00002.h5").unlink(), r"shard shards/text-train-00002\.h5 is missing"),
    (lambda r: _edit_manifest(r, lambda d: d.update(width=D + 1)), r"sentence has shape \(3, 8\), the manifest says \(3, 9\)"),
    (lambda r: _edit_manifest(r, lambda d: d["shards"][0].update(rows=2)), r"has shape \(3, .*the manifest says \(2,"),
    (lambda r: _rewrite_index(r, CAPTIONS_FILE, lambda t: t.pop(4)), r"text split 'test' has 7 tensor rows in its shards but 6 rows in captions.parquet"),
    (lambda r: _rewrite_index(r, CAPTIONS_FILE, lambda t: t[1].update(row=2)), r"row 1 of split 'test'.* points at text-test-00000\.h5 row 2"),
    (lambda r: _rewrite_index(r, CAPTIONS_FILE, lambda t: t[0].update(n_words=0)), r"n_words of 'test-c0' is 0"),
    (lambda r: _rewrite_index(r, CAPTIONS_FILE, lambda t: t[0].update(video_id="nope")), r"refers to video 'nope'"),
    (lambda r: _rewrite_index(r, CAPTIONS_FILE, lambda t: t[1].update(caption_id="test-c0")), r"caption id 'test-c0' appears twice"),
    (lambda r: _edit_manifest(r, lambda d: d["splits"]["test"].update(videos=99)), r"the manifest counts"),
    (lambda r: (r / "failures.parquet").unlink(), r"failures\.parquet is missing"),
    (lambda r: (r / "videos.parquet").write_bytes(b"PAR1 garbage"), r"videos\.parquet is not readable Parquet"),
    (_nan_shard, r"text-test-00000\.h5: sentence holds NaN or inf \(row 0\)"),
    (lambda r: _edit_manifest(r, lambda d: d.update(schema_version=SCHEMA_VERSION + 1)), rf"schema version {SCHEMA_VERSION + 1}"),
])
def test_verify_names_the_first_problem(tmp_path, damage, message):
    root = tmp_path / "c"
    write(root)
    damage(root)
    with pytest.raises(CacheError, match=message) as e:
        verify_cache(root)
    one_line(e)


def test_verify_notes_stray_files(tmp_path):
    write(tmp_path / "c")
    (tmp_path / "c/shards/video-train-00099.h5").write_bytes(b"x")
    (tmp_path / "c" / PROGRESS_DIR).mkdir()
    notes = verify_cache(tmp_path / "c")["notes"]
    assert len(notes) == 2 and "video-train-00099.h5" in notes[0] and "progress/" in notes[1]


def test_info(tmp_path):
    write(tmp_path / "c")
    info = cache_info(tmp_path / "c")
    assert (info["width"], info["n_words"], info["n_frames"], info["schema_version"]) == (D, L, F, SCHEMA_VERSION)
    assert info["model"]["fingerprint"] == "abc123" and info["failures"] == 0 and info["shards"] == 12
    assert info["splits"]["train"] == {"captions": 7, "videos": 7, "text_shards": 3, "video_shards": 3,
                                       "bytes": sum(p.stat().st_size for p in (tmp_path / "c/shards").glob("*-train-*"))}
    r = run_cli("cache", "info", tmp_path / "c", "--json")
    assert json.loads(r.output) == json.loads(json.dumps(info))
    r = run_cli("cache", "info", tmp_path / "c")
    assert "abc123" in r.output and "train" in r.output and "test" in r.output
    r = run_cli("cache", "info", tmp_path, ok=False)
    assert r.exit_code == 1 and "not a diffret cache" in r.output


def test_cache_commands_need_neither_open_clip_nor_decord(tmp_path):
    import subprocess
    import sys

    write(tmp_path / "c")
    code = ("import sys; from diffret.pipeline.cli import main\n"
            "for cmd in ('info', 'verify'):\n"
            "    main(['cache', cmd, sys.argv[1]], standalone_mode=False)\n"
            "bad = [m for m in ('open_clip', 'decord') if m in sys.modules]\n"
            "assert not bad, bad\n")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "c")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "OK:" in r.stdout


# --------------------------------------------------------------------------- refusing mismatches


def test_check_compatible():
    m = manifest()
    check_compatible(m, width=D, fingerprint="abc123", schema_version=SCHEMA_VERSION)  # fits: no error
    check_compatible(m)  # nothing expected: nothing checked
    with pytest.raises(CacheError, match=r"width 8 but the generator in g expects width 512") as e:
        check_compatible(m, width=512, fingerprint="abc123", cache="C", consumer="the generator in g")
    one_line(e)
    with pytest.raises(CacheError, match=r"stage-1 model abc123 but the generator was built on stage-1 model ffff"):
        check_compatible(m, width=D, fingerprint="ffff", consumer="the generator")
    with pytest.raises(CacheError, match=rf"schema version {SCHEMA_VERSION} but .* expects version {SCHEMA_VERSION + 1}"):
        check_compatible(m, schema_version=SCHEMA_VERSION + 1, width=512)  # the version is named first


def test_old_schema_cache_is_refused_by_every_command(tmp_path):
    root = tmp_path / "c"
    write(root)
    _edit_manifest(root, lambda d: d.update(schema_version=SCHEMA_VERSION + 1))
    for cmd in (["cache", "info", root], ["cache", "verify", root],
                ["train-generator", "--cache", root, "--out", tmp_path / "g"]):
        r = run_cli(*cmd, ok=False)
        assert r.exit_code == 1 and f"schema version {SCHEMA_VERSION + 1}" in r.output, r.output


# --------------------------------------------------------------------------- writing: resume, damage, disk full


def test_resumed_writer_equals_an_uninterrupted_one(tmp_path):
    write(tmp_path / "ref")
    write(tmp_path / "c", windows=5)  # "killed" after 5 shards: no manifest, a journal of 5 entries
    assert not (tmp_path / "c" / MANIFEST_NAME).exists() and len(Journal(tmp_path / "c").entries()) == 5
    with pytest.raises(CacheError, match="manifest.json is missing"):
        CacheReader(tmp_path / "c")
    logs = []
    w = CacheWriter(tmp_path / "c", manifest(), shard_rows=3, resume=True, log=logs.append)
    assert [w.completed("video", "train"), w.completed("text", "train"), w.completed("video", "test")] == [3, 2, 0]
    assert w.done_ids("text", "train") == [f"train-c{i}" for i in range(6)]
    write(tmp_path / "c", writer=w)
    assert logs == ["resuming: 5 finished shards kept"]
    assert_same_cache(tmp_path / "ref", tmp_path / "c")
    assert not (tmp_path / "c" / PROGRESS_DIR).exists()
    assert not [p for p in (tmp_path / "c").rglob(".*")]


def test_resume_redoes_damaged_shards_and_discards_another_models(tmp_path):
    write(tmp_path / "ref")
    write(tmp_path / "c", windows=5)
    flip_byte_in(tmp_path / "c/shards/video-train-00001.h5", "frames")
    (tmp_path / "c/shards/.text-train-00002.h5.tmp-999").write_bytes(b"half a shard")  # a killed write
    logs = []
    w = CacheWriter(tmp_path / "c", manifest(), shard_rows=3, resume=True, log=logs.append)
    assert [w.completed("video", "train"), w.completed("text", "train")] == [1, 2]
    assert logs == ["resuming: 3 finished shards kept, 2 to redo (missing or damaged)"]
    assert not (tmp_path / "c/shards/.text-train-00002.h5.tmp-999").exists()
    write(tmp_path / "c", writer=w)
    assert_same_cache(tmp_path / "ref", tmp_path / "c")

    write(tmp_path / "d", windows=4)
    logs = []
    w = CacheWriter(tmp_path / "d", manifest(fp="other"), shard_rows=3, resume=True, log=logs.append)
    assert w.completed("video", "train") == 0 and "another stage-1 model" in logs[0]
    assert list((tmp_path / "d/shards").iterdir()) == []


def test_out_of_space_leaves_no_visible_shard_and_resumes(tmp_path, monkeypatch):
    write(tmp_path / "ref")
    real = h5py.File.create_dataset
    calls = []

    def disk_full(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 10:  # the second dataset of the third shard (4 datasets a video shard)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(h5py.File, "create_dataset", disk_full)
    with pytest.raises(CacheError) as e:
        write(tmp_path / "c")
    assert re.fullmatch(r"cannot write shard shards/video-train-00002\.h5: No space left on device; finished shards "
                        r"are kept, fix the disk and re-run the same command to resume", one_line(e))
    assert sorted(p.name for p in (tmp_path / "c/shards").iterdir()) == ["video-train-00000.h5", "video-train-00001.h5"]
    monkeypatch.undo()
    write(tmp_path / "c", writer=CacheWriter(tmp_path / "c", manifest(), shard_rows=3, resume=True))
    assert_same_cache(tmp_path / "ref", tmp_path / "c")


def test_no_permission_is_one_clear_error(tmp_path, monkeypatch):
    import diffret.cache.writer as writer_mod

    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(writer_mod, "write_shard", denied)
    with pytest.raises(CacheError, match=r"cannot write shard shards/video-train-00000\.h5: Permission denied") as e:
        write(tmp_path / "c")
    one_line(e)
    assert list((tmp_path / "c/shards").iterdir()) == []
    monkeypatch.undo()
    monkeypatch.setattr(writer_mod.Journal, "record", denied)
    with pytest.raises(CacheError, match=r"cannot write the progress journal .*: Permission denied"):
        write(tmp_path / "d")


# --------------------------------------------------------------------------- docs/cache.md


def test_cache_md_snippet_reads_a_cache_without_diffret(tmp_path):
    code = re.search(r"```python\n(.*?)```", (ROOT / "docs" / "cache.md").read_text(), re.S).group(1)
    assert "diffret" not in code
    ns: dict = {}
    exec(compile(code, "docs/cache.md", "exec"), ns)
    write(tmp_path / "c", n=8)
    r = CacheReader(tmp_path / "c")
    for split in ("train", "test"):
        index, text = ns["read_split"](tmp_path / "c", split, "text")
        vindex, video = ns["read_split"](tmp_path / "c", split, "video")
        ours, theirs = r.text(split), r.video(split)
        assert index["caption_id"].to_pylist() == ours.caption_id and vindex["video_id"].to_pylist() == theirs.video_id
        for k in ("sentence", "words", "word_mask", "word_logits"):
            np.testing.assert_array_equal(text[k], getattr(ours, k))
        for k in ("frames", "frame_mask", "frame_logits"):
            np.testing.assert_array_equal(video[k], getattr(theirs, k))
        import torch

        S = wti_similarity(*(torch.as_tensor(np.asarray(x)) for x in (
            ours.words, ours.word_mask, ours.word_logits, theirs.frames, theirs.frame_mask, theirs.frame_logits)))
        np.testing.assert_allclose(ns["wti_scores"](text, video), S.numpy(), rtol=1e-4, atol=1e-5)
