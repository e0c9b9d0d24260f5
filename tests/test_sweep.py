"""`diffret sweep` on a tiny grid: CSV, JSON, printed table and PNG plot; a re-run reuses runs."""
from __future__ import annotations

import csv

import pytest

from conftest import read_json, run_cli
from synthetic_cache import synthetic_cache


@pytest.mark.slow
def test_sweep_writes_table_and_plot(tmp_path):
    cache = synthetic_cache(tmp_path / "cache", n_train=8, n_test=5)
    out = tmp_path / "sweep"
    args = ["sweep", "--cache", cache, "--out", out, "--steps", "5,10", "--schedules", "cosine,linear",
            "--epochs", 1, "--batch-size", 8, "--candidates", 4, "--top-k", 3]
    r = run_cli(*args)
    assert "discriminative" in r.output and "linear" in r.output
    report = read_json(out / "sweep.json")
    runs = {(row["schedule"], row["steps"]) for row in report["rows"]}
    assert runs == {("cosine", 5), ("cosine", 10), ("linear", 5), ("linear", 10)}
    for row in report["rows"]:
        assert 0 <= row["t2v_R@1"] <= row["t2v_R@5"] <= 100 and row["sampler"] == "ddim" and row["loss"] == "ce"
    with open(out / "sweep.csv", newline="") as fh:
        lines = list(csv.DictReader(fh))
    assert len(lines) == 5 and lines[0]["schedule"] == "discriminative"
    assert float(lines[1]["t2v_R@1"]) == report["rows"][0]["t2v_R@1"]
    assert (out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(list((out / "generators").iterdir())) == 4
    again = run_cli(*args)
    assert again.output.count("reusing") == 4
    assert read_json(out / "sweep.json")["rows"][0]["t2v_R@1"] == report["rows"][0]["t2v_R@1"]
    bad = run_cli("sweep", "--cache", cache, "--out", out, "--samplers", "euler", ok=False)
    assert bad.exit_code == 1 and "euler" in bad.output
