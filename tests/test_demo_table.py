"""benchmarks/demo_table.py: its settings come from the Makefile, and a resumed run never mixes settings."""
import importlib.util
import json
import shlex
from types import SimpleNamespace
from pathlib import Path

import pytest

from diffret.extract.config import ExtractConfig
from diffret.pipeline.demo import DemoConfig

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def table():
    spec = importlib.util.spec_from_file_location("demo_table", ROOT / "benchmarks" / "demo_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_settings_read_from_the_makefile(table, tmp_path):
    make = tmp_path / "Makefile"
    make.write_text("X := 1\nDEMO_EXTRACT_FLAGS ?= --epochs 7 \\\n\t--fps uniform\nDEMO_EVAL_FLAGS ?=   --steps 5  \n")
    assert table.makefile_setting("DEMO_EXTRACT_FLAGS", make) == "--epochs 7 --fps uniform"  # continued line
    assert table.makefile_setting("DEMO_EVAL_FLAGS", make) == "--steps 5"
    with pytest.raises(SystemExit, match="sets no DEMO_GENERATOR_FLAGS"):
        table.makefile_setting("DEMO_GENERATOR_FLAGS", make)


def test_the_makefile_demo_settings_parse(table):
    """The repository's own values: every name the table needs is set, and the stage-1 flags are
    valid `extract` options whose training settings differ from the real recipe's (a tiny model)."""
    flags = {n: table.makefile_setting(n) for n in ("DEMO_EXTRACT_FLAGS", "DEMO_GENERATOR_FLAGS", "DEMO_EVAL_FLAGS")}
    toks = shlex.split(flags["DEMO_EXTRACT_FLAGS"])
    assert toks[toks.index("--model") + 1] == "tiny" and "--epochs" in toks
    assert "--epochs" in shlex.split(flags["DEMO_GENERATOR_FLAGS"])
    epochs = int(toks[toks.index("--epochs") + 1])
    assert epochs >= 1 and ExtractConfig(epochs=epochs, model="tiny", pretrained="none")
    assert DemoConfig().n_test >= 1000 and DemoConfig().n_train >= 1000  # the instrument's sizes (docs/benchmarks.md)


def test_shifted_dump_samples_as_the_model_did(table):
    flags = "--model tiny --epochs 3 --fps uniform --frames 8 --lr 1e-3"
    assert table.sampling_flags(flags) == ["--fps", "uniform", "--frames", "8"]
    assert table.sampling_flags("--epochs 3") == []


def test_resume_refuses_other_settings(table, tmp_path):
    first = {"train": 10, "test": 5, "extract": "--epochs 3"}
    table.check_settings(tmp_path, first)
    assert json.loads((tmp_path / "settings.json").read_text()) == first
    table.check_settings(tmp_path, dict(first))  # the same settings: resumes
    with pytest.raises(SystemExit, match=r"other settings \(extract: '--epochs 3', now '--epochs 4'\)"):
        table.check_settings(tmp_path, {**first, "extract": "--epochs 4"})
    with pytest.raises(SystemExit, match="test"):
        table.check_settings(tmp_path, {**first, "test": 6})
    assert json.loads((tmp_path / "settings.json").read_text()) == first  # nothing overwritten


def test_stage1_from_dumps_with_the_earlier_model_instead_of_training(table, tmp_path, monkeypatch):
    """--stage1-from DIR: seed s's cache is `extract --stage1 DIR/s<s>/cache/stage1.pt` with the
    model's sampling flags; without it, stage one trains seeded with s."""
    calls = []
    monkeypatch.setattr(table, "diffret", lambda *args: calls.append([str(a) for a in args]))
    a = SimpleNamespace(stage1_seed=None, stage1_only=True, stage1_from=tmp_path / "check",
                        extract_flags="--model tiny --epochs 16 --frames 8 --fps uniform")
    (tmp_path / "s2").mkdir()
    (tmp_path / "s2" / "in_domain.json").write_text(json.dumps({"results": {"discriminative": {}}}))
    table.run_seed(tmp_path, 2, a)
    assert calls[0][:1] == ["extract"] and calls[0][calls[0].index("--stage1") + 1] == str(
        tmp_path / "check" / "s2" / "cache" / "stage1.pt")
    assert "--epochs" not in calls[0] and calls[0][-5:] == ["--frames", "8", "--fps", "uniform", "--overwrite"]
    calls.clear()
    table.run_seed(tmp_path, 2, SimpleNamespace(**{**vars(a), "stage1_from": None}))
    assert "--stage1" not in calls[0] and calls[0][calls[0].index("--seed") + 1] == "2" and "--epochs" in calls[0]


def test_paired_effects_are_each_seeds_row_minus_its_own_discriminative_row(table):
    def res(disc, dsl):
        return {"in_domain": {"discriminative": {"t2v": {"R@1": disc}, "v2t": {"R@1": disc - 1}, "Rsum": 3 * disc},
                              "dsl": {"t2v": {"R@1": dsl}, "v2t": {"R@1": dsl}, "Rsum": 3 * dsl}}}

    per_seed = [res(60.0, 68.0), res(70.0, 77.0), res(65.0, 74.0)]  # effects 8, 7, 9: a row spread of 5
    d = table.paired(per_seed, rows=("discriminative", "dsl"))["in_domain"]
    assert list(d) == ["dsl"]
    assert d["dsl"]["t2v R@1"] == pytest.approx([8.0, 1.0])
    assert d["dsl"]["v2t R@1"] == pytest.approx([9.0, 1.0]) and d["dsl"]["Rsum"] == pytest.approx([24.0, 3.0])
    assert "| in domain | dsl | +8.0 +- 1.0 | +9.0 +- 1.0 | +24.0 +- 3.0 |" in table.paired_markdown({"in_domain": d}, 3)
