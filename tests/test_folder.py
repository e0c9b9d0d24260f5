"""`--dataset folder`: every video file below a folder is a caption-less gallery; re-runs extract
only added files and refuse changed or removed ones; evaluate refuses such a cache."""
from __future__ import annotations

import os
import shutil

import pytest

from conftest import run_cli
from diffret.cache.store import CacheReader
from diffret.extract.annotations import AnnotationError, load_annotations


def _touch(path, data=b"x"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def test_every_video_below_the_folder_with_relative_ids(tmp_path):
    for rel in ("b.mp4", "a/clip.MKV", "a/deeper/c.webm", "notes.txt", ".hidden/x.mp4", "a/.y.mp4"):
        _touch(tmp_path / rel)
    ann = load_annotations("folder", tmp_path)
    assert list(ann.videos) == ["a/clip.MKV", "a/deeper/c.webm", "b.mp4"]
    assert ann.videos["a/deeper/c.webm"] == tmp_path / "a/deeper/c.webm"
    assert ann.captions == [] and ann.split("train") == [] and ann.video_ids("gallery") == list(ann.videos)
    assert ann.dump_splits == ("gallery",) and ann.splits() == ["gallery"]


def test_a_folder_without_videos_is_refused(tmp_path):
    _touch(tmp_path / "readme.txt")
    with pytest.raises(AnnotationError, match="holds no video files"):
        load_annotations("folder", tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_annotations("folder", tmp_path / "nope")


def test_fine_tuning_on_a_folder_is_refused(tmp_path):
    _touch(tmp_path / "v.mp4")
    r = run_cli("extract", "--dataset", "folder", "--data-root", tmp_path, "--out", tmp_path / "c", "--model", "tiny",
                "--pretrained", "none", ok=False)
    assert r.exit_code != 0 and "no captions" in r.output and "--stage1" in r.output
    assert not (tmp_path / "c").exists()


@pytest.mark.slow
def test_a_folder_collection_grows_by_an_added_file(cache_dir, demo_root, tmp_path):
    folder = tmp_path / "videos"
    src = sorted((demo_root / "videos").glob("*.mp4"))
    for i, p in enumerate(src[:3]):
        _touch(folder / ("sub" if i == 2 else "") / p.name, p.read_bytes())
    out = tmp_path / "cache"
    args = ["extract", "--dataset", "folder", "--data-root", folder, "--out", out, "--stage1",
            cache_dir / "stage1.pt", "--fps", "uniform", "--workers", 0, "--shard-rows", 2]
    run_cli(*args)
    r = CacheReader(out)
    assert r.splits == ["gallery"] and r.video("gallery").video_id == sorted([src[0].name, src[1].name, f"sub/{src[2].name}"])
    assert (out / "stage1.pt").is_file()  # the model queries are encoded with
    run_cli("index", "--cache", out, "--kind", "flat")
    shards = {p.name: p.stat().st_mtime_ns for p in (out / "shards").iterdir()}
    r = run_cli("evaluate", "--cache", out, ok=False)
    assert r.exit_code != 0 and "no queries to evaluate" in r.output

    _touch(folder / "new" / src[3].name, src[3].read_bytes())
    r = run_cli(*args)
    assert "1 new videos added" in r.output
    after = CacheReader(out)
    assert after.video("gallery").video_id[-1] == f"new/{src[3].name}" and len(after.video("gallery")) == 4
    assert all((out / "shards" / n).stat().st_mtime_ns == t for n, t in shards.items())  # finished shards kept
    run_cli("cache", "verify", out)  # the index was rebuilt over the grown cache
    assert sum(after.manifest.index["rows"].values()) == 4
    hits = run_cli("search", "--cache", out, "a shape", "-k", 4, "--json", "-").stdout
    assert f"new/{src[3].name}" in hits
    assert "nothing to do" in run_cli(*args).output

    st = os.stat(folder / src[0].name)
    os.utime(folder / src[0].name, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    r = run_cli(*args, ok=False)
    assert r.exit_code != 0 and f"changed since they were extracted into {out}: {src[0].name}" in r.output
    os.utime(folder / src[0].name, ns=(st.st_atime_ns, st.st_mtime_ns))
    shutil.move(folder / "sub", tmp_path / "moved")
    r = run_cli(*args, ok=False)
    assert r.exit_code != 0 and f"gone from the folder: sub/{src[2].name}" in r.output
    assert len(CacheReader(out).video("gallery")) == 4  # nothing lost
