"""benchmarks/demo_table.py: its settings come from the Makefile, and a resumed run never mixes settings."""
import importlib.util
import json
import shlex
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
    assert DemoConfig().n_test >= 200 and DemoConfig().n_train >= DemoConfig().n_test


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
