"""The spine end to end through the real commands: demo videos -> extract -> train-generator
-> evaluate, plus the one-line errors a user meets first."""
from __future__ import annotations

import csv
import json
import subprocess
import sys

import h5py
import pyarrow.parquet as pq
import pytest
import torch

from conftest import read_json, run_cli


@pytest.mark.slow
def test_extract_writes_a_complete_cache(cache_dir, demo_root):
    manifest = read_json(cache_dir / "manifest.json")
    assert manifest["width"] == 64 and manifest["n_words"] == 32 and manifest["n_frames"] == 12
    assert manifest["model"]["name"] == "tiny" and len(manifest["model"]["fingerprint"]) == 16
    assert manifest["splits"] == {"train": {"captions": 24 * 4, "videos": 24}, "test": {"captions": 12, "videos": 12}}
    captions = pq.read_table(cache_dir / "captions.parquet")
    for col in ("caption_id", "video_id", "caption", "split"):
        assert col in captions.column_names
    assert set(captions["split"].to_pylist()) == {"train", "test"}
    test_rows = [r for r in captions.to_pylist() if r["split"] == "test"]
    with open(demo_root / "MSRVTT_JSFUSION_test.csv", newline="") as f:
        assert [r["caption"] for r in test_rows] == [row["sentence"] for row in csv.DictReader(f)]
    with h5py.File(cache_dir / manifest["shards"][0]["file"]) as f:
        assert all(f[k].dtype.kind in "fu" for k in f)
    ckpt = torch.load(cache_dir / "stage1.pt", weights_only=False)
    assert ckpt["fingerprint"] == manifest["model"]["fingerprint"]
    assert pq.read_table(cache_dir / "failures.parquet").num_rows == 0


@pytest.mark.slow
def test_train_generator_needs_neither_open_clip_nor_decord(cache_dir, tmp_path):
    """Stage two runs from the cache alone: open_clip and decord are never imported."""
    out = tmp_path / "gen"
    code = (
        "import sys\n"
        "from diffret.pipeline.cli import main\n"
        "try:\n"
        f"    main(['train-generator', '--cache', r'{cache_dir}', '--out', r'{out}', '--epochs', '1',"
        " '--batch-size', '16', '--candidates', '8', '--steps', '10'])\n"
        "except SystemExit as e:\n"
        "    assert e.code in (0, None), e.code\n"
        "bad = [m for m in ('open_clip', 'decord') if m in sys.modules]\n"
        "assert not bad, bad\n"
        "print('clean')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "clean" in proc.stdout
    meta = json.loads((out / "generator.json").read_text())
    assert meta["width"] == 64
    assert meta["parameters"] == {"t2v": 10 * 64**2 + 7 * 64 + 1, "v2t": 10 * 64**2 + 7 * 64 + 1}
    assert meta["config"]["train_steps"] == 10 and meta["config"]["candidates"] == 8


@pytest.mark.slow
def test_evaluate_reports_both_rows(cache_dir, generator_dir, tmp_path):
    out = tmp_path / "metrics.json"
    result = run_cli("evaluate", "--cache", cache_dir, "--generator", generator_dir, "--steps", 10,
                     "--top-k", 5, "--json", out)
    assert "discriminative" in result.output and "diffusion" in result.output
    report = read_json(out)
    assert report["n_queries"] == 12 and report["n_candidates"] == 12 and report["steps"] == 10
    for row in ("discriminative", "diffusion"):
        r = report["results"][row]
        for d in ("t2v", "v2t"):
            assert set(r[d]) == {"R@1", "R@5", "R@10", "MdR", "MnR"}
            assert 0 <= r[d]["R@1"] <= r[d]["R@5"] <= r[d]["R@10"] <= 100
            assert 1 <= r[d]["MdR"] <= 12 and 1 <= r[d]["MnR"] <= 12
        assert r["Rsum"] == sum(r[d][k] for d in ("t2v", "v2t") for k in ("R@1", "R@5", "R@10"))
    # Re-ranking touches only each query's top-5: R@10 and beyond cannot change.
    disc, diff = report["results"]["discriminative"], report["results"]["diffusion"]
    assert disc["t2v"]["R@10"] == diff["t2v"]["R@10"] and disc["v2t"]["R@10"] == diff["v2t"]["R@10"]


def test_missing_data_root_is_one_line(tmp_path):
    r = run_cli("extract", "--data-root", tmp_path / "nope", "--out", tmp_path / "c", ok=False)
    assert r.exit_code == 1
    assert r.output.strip().count("\n") == 0 and "does not exist" in r.output


def test_unknown_dataset_is_one_line(demo_root, tmp_path):
    r = run_cli("extract", "--dataset", "kinetics", "--data-root", demo_root, "--out", tmp_path / "c", ok=False)
    assert r.exit_code == 1 and "unknown dataset" in r.output and r.output.strip().count("\n") == 0


@pytest.mark.slow
def test_a_folder_that_is_not_a_cache_is_refused(tmp_path, generator_dir):
    (tmp_path / "junk").mkdir()
    for cmd in (["train-generator", "--cache", tmp_path / "junk", "--out", tmp_path / "g"],
                ["evaluate", "--cache", tmp_path / "junk", "--generator", generator_dir]):
        r = run_cli(*cmd, ok=False)
        assert r.exit_code == 1 and "not a diffret cache" in r.output, r.output


@pytest.mark.slow
def test_extract_refuses_to_clobber_a_cache(cache_dir, demo_root):
    r = run_cli("extract", "--data-root", demo_root, "--out", cache_dir, "--model", "tiny", "--pretrained", "none",
                ok=False)
    assert r.exit_code == 1 and "--overwrite" in r.output
