"""cache/atomic.py: a write either replaces the file whole or leaves the old one, and no temporary."""
import os

import pytest
import torch

from diffret.cache.atomic import atomic_open, atomic_write, atomic_write_text, is_temp_name, temp_name


class Boom(RuntimeError):
    pass


def _only(folder):
    return sorted(p.name for p in folder.iterdir())


def test_writes_replace_the_file_whole(tmp_path):
    path = tmp_path / "report.json"
    atomic_write_text(path, "old\n")
    atomic_write_text(path, "new\n")
    assert path.read_text() == "new\n"
    with atomic_open(tmp_path / "w.pt") as fh:
        torch.save({"x": torch.arange(3)}, fh)
    assert torch.equal(torch.load(tmp_path / "w.pt")["x"], torch.arange(3))
    atomic_write(tmp_path / "b.bin", lambda tmp: tmp.write_bytes(b"\x00\x01"))
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    assert _only(tmp_path) == ["b.bin", "report.json", "w.pt"]  # no temporary left


@pytest.mark.parametrize("how", ["open", "path"])
def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path, how):
    path = tmp_path / "manifest.json"
    path.write_text("old, whole\n")

    def half_then_fail(fh_or_tmp):
        if how == "open":
            fh_or_tmp.write("new, ha")
        else:
            fh_or_tmp.write_text("new, ha")
        assert temp_name(path).exists()  # the half file exists only under the temporary name
        raise Boom("disk full")

    with pytest.raises(Boom):
        if how == "open":
            with atomic_open(path, "w") as fh:
                half_then_fail(fh)
        else:
            atomic_write(path, half_then_fail)
    assert path.read_text() == "old, whole\n"
    assert _only(tmp_path) == ["manifest.json"]


def test_temporary_names_are_hidden_per_process_and_recognised(tmp_path):
    tmp = temp_name(tmp_path / "text-train-00000.h5")
    assert tmp.parent == tmp_path and tmp.name == f".text-train-00000.h5.tmp-{os.getpid()}"
    assert is_temp_name(tmp.name) and not is_temp_name("text-train-00000.h5")
