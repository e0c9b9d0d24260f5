"""The feature cache: HDF5 shards + Parquet index + manifest, written atomically, read back exactly."""
import json

import h5py
import numpy as np
import pyarrow.parquet as pq
import pytest

from diffret.cache.manifest import (
    MANIFEST_NAME,
    SCHEMA_VERSION,
    CacheError,
    Manifest,
    read_manifest,
    sha256_file,
    write_manifest,
)
from diffret.cache.shards import FIELDS, write_shard
from diffret.cache.store import (
    CAPTIONS_FILE,
    FAILURES_FILE,
    CacheReader,
    CacheWriter,
    VideoFeatures,
    read_failures,
    write_failures,
)

D, L, F = 8, 5, 4


def make_manifest() -> Manifest:
    return Manifest(
        width=D, n_words=L, n_frames=F,
        model={"name": "tiny", "pretrained": "", "fingerprint": "abc123"},
        extract_config={"fps": 1, "max_frames": F, "max_words": L},
        dataset="toy",
    )


def _mask(rng, n, slots):
    m = rng.random((n, slots)) < 0.6
    m[:, 0] = True  # at least one valid slot per row
    return m


def text_rows(rng, split, start, n):
    return dict(
        caption_ids=[f"{split}-c{start + i}" for i in range(n)],
        video_ids=[f"{split}-v{(start + i) % 3}" for i in range(n)],
        captions=[f"caption number {start + i} of {split}" for i in range(n)],
        sentence=rng.standard_normal((n, D)).astype(np.float32),
        words=rng.standard_normal((n, L, D)).astype(np.float32),
        word_mask=_mask(rng, n, L),
        word_logits=rng.standard_normal((n, L)).astype(np.float32),
    )


def video_rows(rng, split, start, n):
    return dict(
        video_ids=[f"{split}-v{start + i}" for i in range(n)],
        paths=[f"/videos/{split}-v{start + i}.mp4" for i in range(n)],
        frames=rng.standard_normal((n, F, D)).astype(np.float32),
        frame_mask=_mask(rng, n, F),
        frame_logits=rng.standard_normal((n, F)).astype(np.float32),
    )


def _cat(parts):
    out = {}
    for p in parts:
        for k, v in p.items():
            out.setdefault(k, []).append(v)
    return {k: (np.concatenate(v) if isinstance(v[0], np.ndarray) else sum(v, [])) for k, v in out.items()}


def build_cache(root):
    """Two splits, several add calls per split, interleaved, crossing 3-row shard boundaries."""
    rng = np.random.default_rng(0)
    w = CacheWriter(root, make_manifest(), shard_rows=3)
    written = {("text", "train"): [], ("video", "train"): [], ("text", "test"): [], ("video", "test"): []}
    plan = [
        ("text", "train", 0, 2), ("video", "train", 0, 1), ("text", "test", 0, 4),
        ("text", "train", 2, 4), ("video", "train", 1, 4), ("video", "test", 0, 2),
        ("text", "train", 6, 1),
    ]
    for kind, split, start, n in plan:
        rows = (text_rows if kind == "text" else video_rows)(rng, split, start, n)
        (w.add_text if kind == "text" else w.add_video)(split, **rows)
        written[(kind, split)].append(rows)
    manifest = w.close()
    return manifest, {k: _cat(v) for k, v in written.items()}


def test_round_trip(tmp_path):
    root = tmp_path / "cache"
    manifest, written = build_cache(root)
    r = CacheReader(root)
    assert r.splits == ["test", "train"]

    for split, nc, nv in (("train", 7, 5), ("test", 4, 2)):
        exp = written[("text", split)]
        t = r.text(split)
        assert len(t) == nc
        assert t.caption_id == exp["caption_ids"]
        assert t.video_id == exp["video_ids"]
        assert t.caption == exp["captions"]
        for name in ("sentence", "words", "word_logits"):
            got = getattr(t, name)
            assert got.dtype == np.float16
            np.testing.assert_array_equal(got, exp[name].astype(np.float16))
        assert t.word_mask.dtype == bool
        np.testing.assert_array_equal(t.word_mask, exp["word_mask"])

        exp = written[("video", split)]
        v = r.video(split)
        assert len(v) == nv
        assert v.video_id == exp["video_ids"]
        for name in ("frames", "frame_logits"):
            got = getattr(v, name)
            assert got.dtype == np.float16
            np.testing.assert_array_equal(got, exp[name].astype(np.float16))
        assert v.frame_mask.dtype == bool
        np.testing.assert_array_equal(v.frame_mask, exp["frame_mask"])

    # Parquet index: columns, order, shard/row placement, lengths
    idx = r.index("text")
    assert {"caption_id", "video_id", "caption", "split", "shard", "row", "n_words"} <= set(idx.column_names)
    tr = r.index("text", "train").to_pylist()
    assert [x["caption_id"] for x in tr] == written[("text", "train")]["caption_ids"]
    assert [(x["shard"], x["row"]) for x in tr] == [(f"text-train-{i // 3:05d}.h5", i % 3) for i in range(7)]
    assert [x["n_words"] for x in tr] == written[("text", "train")]["word_mask"].sum(1).tolist()
    vi = r.index("video", "train").to_pylist()
    assert {"video_id", "split", "path", "shard", "row", "n_frames"} <= set(vi[0])
    assert [x["path"] for x in vi] == written[("video", "train")]["paths"]
    assert [x["n_frames"] for x in vi] == written[("video", "train")]["frame_mask"].sum(1).tolist()
    assert [(x["shard"], x["row"]) for x in vi] == [(f"video-train-{i // 3:05d}.h5", i % 3) for i in range(5)]

    # Manifest: split counts, shard records, checksums; read back equal to what close() returned
    m = read_manifest(root)
    assert m == manifest
    assert m.splits == {"train": {"captions": 7, "videos": 5}, "test": {"captions": 4, "videos": 2}}
    assert (m.width, m.n_words, m.n_frames, m.dtype, m.fingerprint) == (D, L, F, "float16", "abc123")
    counts = {}
    for s in m.shards:
        counts[(s.kind, s.split)] = counts.get((s.kind, s.split), 0) + s.rows
        assert s.sha256 == sha256_file(root / s.file)
        assert 1 <= s.rows <= 3
    assert counts == {("text", "train"): 7, ("video", "train"): 5, ("text", "test"): 4, ("video", "test"): 2}
    assert len(m.shards) == 3 + 2 + 2 + 1

    # HDF5 layout: float16 tensors, uint8 masks, chunked along the row axis only
    for s in m.shards:
        with h5py.File(root / s.file, "r") as f:
            assert set(f.keys()) == set(FIELDS[s.kind])
            for name in FIELDS[s.kind]:
                ds = f[name]
                assert ds.shape[0] == s.rows
                assert ds.dtype == (np.uint8 if name.endswith("_mask") else np.float32 if name == "frame_times"
                                    else np.float16)
                assert ds.chunks is not None and ds.chunks[1:] == ds.shape[1:]
                assert ds.compression is None

    # No temporary files anywhere
    assert not [p for p in root.rglob("*") if p.name.startswith(".")]


def _one_line(e):
    msg = str(e.value)
    assert msg and "\n" not in msg
    return msg


def test_read_manifest_errors(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(CacheError, match="not a directory") as e:
        read_manifest(afile)
    _one_line(e)
    with pytest.raises(CacheError, match="not a directory"):
        read_manifest(tmp_path / "does-not-exist")

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CacheError, match="manifest.json is missing") as e:
        read_manifest(empty)
    _one_line(e)

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(CacheError, match="not a valid cache manifest") as e:
        read_manifest(bad)
    _one_line(e)
    (bad / MANIFEST_NAME).write_text(json.dumps({"width": 8}))  # valid JSON, missing fields
    with pytest.raises(CacheError, match="not a valid cache manifest") as e:
        read_manifest(bad)
    _one_line(e)
    (bad / MANIFEST_NAME).write_text("[1, 2]")  # valid JSON, not an object
    with pytest.raises(CacheError, match="not a valid cache manifest"):
        read_manifest(bad)

    old = tmp_path / "old"
    old.mkdir()
    d = make_manifest().to_dict()
    d["schema_version"] = SCHEMA_VERSION + 1
    (old / MANIFEST_NAME).write_text(json.dumps(d))
    with pytest.raises(CacheError, match=f"schema version {SCHEMA_VERSION + 1}") as e:
        read_manifest(old)
    assert "re-run" in _one_line(e)
    # A future schema may also change the fields: the version is still what the message names.
    (old / MANIFEST_NAME).write_text(json.dumps({"schema_version": SCHEMA_VERSION + 1, "tensors": {}}))
    with pytest.raises(CacheError, match=f"schema version {SCHEMA_VERSION + 1}"):
        read_manifest(old)


def test_reader_errors(tmp_path):
    only_manifest = tmp_path / "only-manifest"
    only_manifest.mkdir()
    write_manifest(only_manifest, make_manifest())
    with pytest.raises(CacheError, match=CAPTIONS_FILE) as e:
        CacheReader(only_manifest)
    assert "incomplete" in _one_line(e)

    root = tmp_path / "cache"
    build_cache(root)
    r = CacheReader(root)
    with pytest.raises(CacheError, match="'nope'") as e:
        r.text("nope")
    _one_line(e)
    with pytest.raises(CacheError, match="'nope'"):
        r.video("nope")

    (root / "shards" / "video-train-00001.h5").unlink()
    r.text("train")  # the other kind of the split is unaffected
    with pytest.raises(CacheError, match="shards/video-train-00001.h5 is missing") as e:
        r.video("train")
    _one_line(e)


def test_write_shard_is_atomic(tmp_path, monkeypatch):
    n = 4
    arrays = dict(
        sentence=np.zeros((n, D)), words=np.zeros((n, L, D)),
        word_mask=np.ones((n, L), bool), word_logits=np.zeros((n, L)),
    )
    real = h5py.File.create_dataset
    calls = []

    def failing(self, *args, **kwargs):
        calls.append(args[0] if args else kwargs.get("name"))
        if len(calls) == 2:
            raise OSError("disk full (simulated)")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(h5py.File, "create_dataset", failing)
    out = tmp_path / "shards"
    out.mkdir()
    with pytest.raises(OSError, match="simulated"):
        write_shard(out / "text-train-00000.h5", "text", arrays)
    assert len(calls) == 2
    assert list(out.iterdir()) == []  # neither the final name nor a temporary file

    monkeypatch.undo()
    assert write_shard(out / "text-train-00000.h5", "text", arrays) == n
    assert [p.name for p in out.iterdir()] == ["text-train-00000.h5"]


def test_failures_round_trip(tmp_path):
    rows = [("v1", "/data/v1.mp4", "cannot decode: moov atom not found"), ("v7", "/data/v7.avi", "zero frames")]
    path = write_failures(tmp_path, rows)
    assert path == tmp_path / FAILURES_FILE
    assert read_failures(tmp_path) == [dict(zip(("video_id", "path", "reason"), r)) for r in rows]

    empty = tmp_path / "empty"
    empty.mkdir()
    assert read_failures(empty) == []  # no file yet
    path = write_failures(empty, [])
    assert path.is_file()
    assert pq.read_schema(path).names == ["video_id", "path", "reason"]
    assert read_failures(empty) == []
    assert not [p for p in tmp_path.rglob("*") if p.name.startswith(".")]


def test_index_of():
    v = VideoFeatures(
        video_id=["a", "b", "c"], frames=np.zeros((3, F, D), np.float16),
        frame_mask=np.ones((3, F), bool), frame_logits=np.zeros((3, F), np.float16),
    )
    idx = v.index_of(["c", "a", "a", "b"])
    assert idx.dtype == np.int64
    assert idx.tolist() == [2, 0, 0, 1]
    assert v.index_of([]).tolist() == []
    with pytest.raises(CacheError, match="'zz'") as e:
        v.index_of(["a", "zz"])
    _one_line(e)


def test_split_with_one_kind_only_reads_as_empty(tmp_path):
    rng = np.random.default_rng(1)
    w = CacheWriter(tmp_path, make_manifest(), shard_rows=3)
    w.add_text("query-bank", **text_rows(rng, "query-bank", 0, 2))  # captions, no videos
    w.close()
    r = CacheReader(tmp_path)
    assert len(r.text("query-bank")) == 2
    v = r.video("query-bank")
    assert len(v) == 0
    assert v.frames.shape == (0, F, D) and v.frames.dtype == np.float16
    assert v.frame_mask.shape == (0, F) and v.frame_mask.dtype == bool
    assert v.frame_logits.shape == (0, F)


def test_a_window_whose_every_video_failed_leaves_no_shard_and_closes(tmp_path):
    """A dump window in which every video failed is journaled without a file; close() skips it
    (it used to raise a TypeError on the missing file name) and the other windows' rows stay."""
    rng = np.random.default_rng(2)
    w = CacheWriter(tmp_path, make_manifest(), shard_rows=3)
    w.add_failures([("bad0", "/v/bad0.mp4", "cannot open")], split="test")
    w.end_shard("video", "test")  # the first window: nothing decoded
    w.add_video("test", **video_rows(rng, "test", 0, 2))
    w.end_shard("video", "test")
    m = w.close()
    assert [s.rows for s in m.shards] == [2] and m.splits["test"]["videos"] == 2
    assert len(CacheReader(tmp_path).video("test")) == 2
