"""A checksum on every file diffret trusts: the manifest records the sha256 of the Parquet index
files, failures.parquet and stage1.pt (the shards have their own), `cache verify` checks them;
generator.json records generator.pt's, every load checks it; manifest.json is checked against its
schema (required keys and their types), each problem one line naming the file or the key."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from conftest import run_cli
from synthetic_cache import synthetic_cache

from diffret.cache.manifest import MANIFEST_NAME, CacheError, Manifest, read_manifest, sha256_file
from diffret.cache.store import CacheReader, CacheWriter
from diffret.cache.verify import verify_cache
from diffret.generator.checkpoint import META_NAME, WEIGHTS_NAME, GeneratorError, load_generator

D, L, F = 8, 4, 3
WEIGHTS_SHA_KEY = "weights_sha256"  # the generator.json field docs/troubleshooting.md names


def one_line(e) -> str:
    msg = str(e.value)
    assert msg and "\n" not in msg
    return msg


def cli_error(*args) -> str:
    """Run a command that must fail: exit status 1 and exactly one `Error:` line -> that line."""
    r = run_cli(*args, ok=False)
    errors = [line for line in r.output.splitlines() if line.startswith("Error:")]
    assert r.exit_code == 1 and len(errors) == 1, r.output
    assert "Traceback" not in r.output, r.output
    return errors[0]


def small_cache(root: Path) -> Path:
    """A cache with every kind of file: two splits, a failure and a stage1.pt (written before
    the manifest, as `diffret extract` does)."""
    rng = np.random.default_rng(0)
    man = Manifest(width=D, n_words=L, n_frames=F, dataset="toy", extract_config={},
                   model={"name": "tiny", "pretrained": "none", "fingerprint": "abc123"})
    root.mkdir(parents=True)
    torch.save({"state_dict": {"w": torch.arange(64, dtype=torch.float32)}}, root / "stage1.pt")
    w = CacheWriter(root, man, shard_rows=4)
    for split in ("train", "test"):
        vids = [f"{split}{i}" for i in range(5)]
        w.add_video(split, vids, [f"/v/{v}.mp4" for v in vids], rng.normal(size=(5, F, D)), np.ones((5, F), bool),
                    rng.normal(size=(5, F)))
        w.add_text(split, [f"{split}c{i}" for i in range(5)], vids, [f"caption {i}" for i in range(5)],
                   rng.normal(size=(5, D)), rng.normal(size=(5, L, D)), np.ones((5, L), bool), rng.normal(size=(5, L)))
    w.add_failures([("broken7", "/v/broken7.mp4", "file not found")])
    w.close()
    return root


def flip_in(path: Path, old: bytes, new: bytes) -> None:
    """Change the first occurrence of `old` in the file's bytes to `new` (same length): one byte
    here, inside a string the Parquet file stores as is, so the file stays readable."""
    data = path.read_bytes()
    at = data.find(old)
    assert at >= 0 and len(old) == len(new), (path, old)
    path.write_bytes(data[:at] + new + data[at + len(old):])


def test_the_manifest_records_every_file_and_verify_passes(tmp_path):
    root = small_cache(tmp_path / "c")
    m = read_manifest(root)
    assert set(m.files) == {"captions.parquet", "videos.parquet", "failures.parquet", "stage1.pt"}
    assert all(sha256_file(root / name) == digest for name, digest in m.files.items())
    assert verify_cache(root)["failures"] == 1
    assert "OK" in run_cli("cache", "verify", root).output
    # A cache without stage1.pt (written with --stage1 elsewhere, or synthetic) records what it has.
    assert set(read_manifest(synthetic_cache(tmp_path / "s")).files) == {"captions.parquet", "videos.parquet",
                                                                         "failures.parquet"}


@pytest.mark.parametrize("name, old, new", [
    # A caption now points at another video of the split: evaluate would score the wrong ground truth.
    ("captions.parquet", b"test0", b"test1"),
    ("videos.parquet", b"/v/test0.mp4", b"/v/test1.mp4"),
    ("failures.parquet", b"file not found", b"file not fount"),
    ("stage1.pt", None, None),
])
def test_verify_catches_one_changed_byte_in_each_file(tmp_path, name, old, new):
    root = small_cache(tmp_path / "c")
    path = root / name
    if old is None:  # a byte in the middle of the checkpoint
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0x01
        path.write_bytes(bytes(data))
    else:
        before = pq.read_table(path)
        flip_in(path, old, new)
        assert not pq.read_table(path).equals(before)  # still readable Parquet, other content: only the checksum can tell
    with pytest.raises(CacheError, match=rf"{name} is corrupted: its sha256 differs") as e:
        verify_cache(root)
    one_line(e)
    assert f"{name} is corrupted" in cli_error("cache", "verify", root)


def test_verify_refuses_a_checksummed_file_the_manifest_does_not_record(tmp_path):
    root = small_cache(tmp_path / "c")
    d = json.loads((root / MANIFEST_NAME).read_text())
    del d["files"]["captions.parquet"]
    (root / MANIFEST_NAME).write_text(json.dumps(d))
    with pytest.raises(CacheError, match=r"records no sha256 of captions\.parquet") as e:
        verify_cache(root)
    one_line(e)
    d["files"]["captions.parquet"] = sha256_file(root / "captions.parquet")
    (root / MANIFEST_NAME).write_text(json.dumps(d))
    (root / "stage1.pt").unlink()
    with pytest.raises(CacheError, match=r"stage1\.pt is missing") as e:
        verify_cache(root)
    one_line(e)


@pytest.mark.slow
def test_an_extracted_cache_records_its_stage1_checkpoint(cache_dir, tmp_path):
    m = read_manifest(cache_dir)
    assert m.files["stage1.pt"] == sha256_file(cache_dir / "stage1.pt")
    assert {"captions.parquet", "videos.parquet", "failures.parquet"} <= set(m.files)
    copy = tmp_path / "cache"
    shutil.copytree(cache_dir, copy)
    verify_cache(copy)
    data = bytearray((copy / "stage1.pt").read_bytes())
    data[-100] ^= 0x01
    (copy / "stage1.pt").write_bytes(bytes(data))
    assert "stage1.pt is corrupted" in cli_error("cache", "verify", copy)


# --------------------------------------------------------------------------- manifest schema


def edit_manifest(root: Path, change) -> None:
    d = json.loads((root / MANIFEST_NAME).read_text())
    change(d)
    (root / MANIFEST_NAME).write_text(json.dumps(d))


@pytest.mark.parametrize("change, message", [
    (lambda d: d.pop("splits"), r"the required key 'splits' \(an object\) is missing"),
    (lambda d: d.pop("shards"), r"the required key 'shards' \(a list\) is missing"),
    (lambda d: d.pop("schema_version"), r"the required key 'schema_version' \(an integer\) is missing"),
    (lambda d: d.update(schema_version="2"), r"key 'schema_version' must be an integer, not a string \(\"2\"\)"),
    (lambda d: d.update(schema_version="1"), r"key 'schema_version' must be an integer, not a string \(\"1\"\)"),
    (lambda d: d.update(width="8"), r"key 'width' must be an integer, not a string"),
    (lambda d: d.update(n_frames=True), r"key 'n_frames' must be an integer, not a boolean"),
    (lambda d: d.update(model=None), r"key 'model' must be an object, not null"),
    (lambda d: d.update(splits={"test": {"captions": 5}}), r"splits\['test'\] lacks the key 'videos'"),
    (lambda d: d["shards"][1].pop("sha256"), r"shards\[1\] lacks the key 'sha256' \(a string\)"),
    (lambda d: d["shards"][0].update(rows="4"), r"shards\[0\]\['rows'\] must be an integer, not a string"),
    (lambda d: d.update(files=["captions.parquet"]), r"key 'files' must be an object, not a list"),
    (lambda d: d["files"].update({"videos.parquet": 7}), r"files\['videos.parquet'\] must be a string"),
])
def test_a_manifest_that_breaks_its_schema_is_one_line_naming_the_key(tmp_path, change, message):
    root = small_cache(tmp_path / "c")
    edit_manifest(root, change)
    for read in (read_manifest, verify_cache, CacheReader):
        with pytest.raises(CacheError, match=rf"manifest\.json is not a valid cache manifest: {message}") as e:
            read(root)
        one_line(e)
    assert "not a valid cache manifest" in cli_error("cache", "verify", root)


def test_another_schema_version_is_still_named_first(tmp_path):
    root = small_cache(tmp_path / "c")
    edit_manifest(root, lambda d: (d.update(schema_version=3), d.pop("splits")))
    with pytest.raises(CacheError, match=r"has cache schema version 3, this diffret reads version 2"):
        read_manifest(root)


# --------------------------------------------------------------------------- generator.pt


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(cache, generator folder) of a tiny generator trained on a synthetic cache."""
    base = tmp_path_factory.mktemp("gen")
    cache = synthetic_cache(base / "cache", n_train=8, train_caps=1, n_test=4)
    run_cli("train-generator", "--cache", cache, "--out", base / "gen", "--epochs", 1, "--batch-size", 8,
            "--candidates", 4, "--steps", 10, "--lr", "1e-3")
    return cache, base / "gen"


def test_generator_json_records_the_checksum_of_generator_pt(trained):
    _, gen = trained
    meta = json.loads((gen / META_NAME).read_text())
    assert meta[WEIGHTS_SHA_KEY] == sha256_file(gen / WEIGHTS_NAME)
    load_generator(gen)  # matches: loads


def test_a_changed_weight_is_refused_on_load(trained, tmp_path):
    cache, gen = trained
    bad = tmp_path / "gen"
    shutil.copytree(gen, bad)
    state = torch.load(bad / WEIGHTS_NAME, weights_only=False)
    name = next(iter(state["t2v"]))
    state["t2v"][name].view(-1)[0] = 8e9
    torch.save(state, bad / WEIGHTS_NAME)
    with pytest.raises(GeneratorError, match=r"generator\.pt does not match generator\.json: its sha256 differs") as e:
        load_generator(bad)
    one_line(e)
    assert "generator.pt does not match generator.json" in cli_error("evaluate", "--cache", cache, "--generator", bad,
                                                                     "--steps", 2, "--top-k", 2)


def test_a_generator_json_without_the_checksum_is_accepted(trained, tmp_path):
    """Written before checksums were recorded: nothing to compare it with, so it loads."""
    _, gen = trained
    old = tmp_path / "gen"
    shutil.copytree(gen, old)
    meta = json.loads((old / META_NAME).read_text())
    del meta[WEIGHTS_SHA_KEY]
    (old / META_NAME).write_text(json.dumps(meta))
    load_generator(old)
    (old / META_NAME).write_text("{not json")
    with pytest.raises(GeneratorError, match=r"cannot read .*generator\.json") as e:
        load_generator(old)
    one_line(e)
