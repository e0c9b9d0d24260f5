"""MSVD, LSMDC, ActivityNet Captions, DiDeMo and the generic manifest, on tiny hand-written
files in each dataset's real format."""
import json
import pickle
from pathlib import Path

import pytest

from diffret.extract.annotations import AnnotationError, Caption, dataset_names, load_annotations
from diffret.extract.config import default_slots


def touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


# --------------------------------------------------------------------------- MSVD


def write_msvd(root: Path) -> Path:
    root.mkdir(parents=True)
    caps = {  # raw-captions.pkl: video id -> list of token lists
        "-4wsuPCjDBc_5_15": [["a", "squirrel", "is", "eating"], ["a", "chipmunk", "eats"]],
        "-7KMZQEsJW4_205_208": [["a", "man", "is", "singing"]],
        "-8y1Q0rA3n8_108_115": [["a", "woman", "slices", "an", "onion"], ["someone", "cuts", "onion"],
                                ["a", "lady", "is", "cutting"]],
        "unused_1_2": [["never", "listed"]],
    }
    (root / "raw-captions.pkl").write_bytes(pickle.dumps(caps))
    (root / "train_list.txt").write_text("-4wsuPCjDBc_5_15\n\n")
    (root / "val_list.txt").write_text("-7KMZQEsJW4_205_208\n")
    (root / "test_list.txt").write_text("-8y1Q0rA3n8_108_115\n")
    touch(root / "YouTubeClips" / "-4wsuPCjDBc_5_15.avi")
    return root


def test_msvd_every_caption_and_multi_caption_test(tmp_path):
    root = write_msvd(tmp_path / "msvd")
    ann = load_annotations("msvd", root)
    assert ann.split("train") == [
        Caption("-4wsuPCjDBc_5_15#0", "-4wsuPCjDBc_5_15", "a squirrel is eating", "train"),
        Caption("-4wsuPCjDBc_5_15#1", "-4wsuPCjDBc_5_15", "a chipmunk eats", "train"),
    ]
    assert [c.caption_id for c in ann.split("val")] == ["-7KMZQEsJW4_205_208#0"]
    test = ann.split("test")  # every caption of a test video is a test query
    assert [c.text for c in test] == ["a woman slices an onion", "someone cuts onion", "a lady is cutting"]
    assert {c.video_id for c in test} == {"-8y1Q0rA3n8_108_115"} and ann.video_ids("test") == ["-8y1Q0rA3n8_108_115"]
    assert "unused_1_2" not in ann.videos
    assert ann.videos["-4wsuPCjDBc_5_15"] == root / "YouTubeClips" / "-4wsuPCjDBc_5_15.avi"  # found
    assert ann.videos["-8y1Q0rA3n8_108_115"] == root / "YouTubeClips" / "-8y1Q0rA3n8_108_115.avi"  # missing: default


def test_msvd_errors(tmp_path):
    root = write_msvd(tmp_path / "msvd")
    (root / "test_list.txt").write_text("-8y1Q0rA3n8_108_115\nnope_0_1\n")
    with pytest.raises(AnnotationError, match=r"test_list\.txt line 2: video 'nope_0_1' has no captions"):
        load_annotations("msvd", root)
    (root / "raw-captions.pkl").write_bytes(pickle.dumps({"v": [[1, 2]]}))
    with pytest.raises(AnnotationError, match="not a list of token strings"):
        load_annotations("msvd", root)
    # a pickle that would run code is refused, not executed
    (root / "raw-captions.pkl").write_bytes(pickle.dumps(Path("/etc/passwd")))
    with pytest.raises(AnnotationError, match="refusing to load"):
        load_annotations("msvd", root)
    (root / "train_list.txt").unlink()
    with pytest.raises(FileNotFoundError, match="train_list.txt"):
        load_annotations("msvd", root)


# --------------------------------------------------------------------------- LSMDC

LSMDC_TRAIN = (
    "0001_American_Beauty_00.00.51.926-00.00.54.129\t00.00.51.926\t00.00.54.129\t00.00.51.000\t00.00.55.000\t"
    "SOMEONE looks at the sky.\n"
    "0001_American_Beauty_00.00.56.000-00.00.58.000\t00.00.56.000\t00.00.58.000\t00.00.56.000\t00.00.58.000\t"
    "He smiles.\n"
)
LSMDC_TEST = (
    "1010_TITANIC_00.41.32.072-00.41.40.196\t00.41.32.072\t00.41.40.196\t00.41.32.000\t00.41.41.000\t"
    "A ship sails.\n"
)


def test_lsmdc_tab_separated_files_and_movie_folders(tmp_path):
    root = tmp_path / "lsmdc"
    root.mkdir()
    (root / "LSMDC16_annos_training.csv").write_text(LSMDC_TRAIN)
    (root / "LSMDC16_challenge_1000_publictect.csv").write_text(LSMDC_TEST)
    nested = touch(root / "videos" / "0001_American_Beauty" / "0001_American_Beauty_00.00.51.926-00.00.54.129.avi")
    deep = touch(root / "videos" / "extra" / "1010_TITANIC" / "1010_TITANIC_00.41.32.072-00.41.40.196.mp4")
    ann = load_annotations("lsmdc", root)
    assert ann.split("train")[0] == Caption(
        "0001_American_Beauty_00.00.51.926-00.00.54.129#0", "0001_American_Beauty_00.00.51.926-00.00.54.129",
        "SOMEONE looks at the sky.", "train")
    assert [c.text for c in ann.split("test")] == ["A ship sails."] and ann.split("val") == []
    assert ann.videos["0001_American_Beauty_00.00.51.926-00.00.54.129"] == nested  # <movie>/<clip>.avi
    assert ann.videos["1010_TITANIC_00.41.32.072-00.41.40.196"] == deep  # found by walking the folder
    (root / "LSMDC16_annos_val.csv").write_text("only_two\tfields\n")
    with pytest.raises(AnnotationError, match=r"LSMDC16_annos_val\.csv line 1: expected 6 tab-separated fields"):
        load_annotations("lsmdc", root)


# --------------------------------------------------------------------------- ActivityNet Captions


def test_activitynet_paragraphs_val1_as_test(tmp_path):
    root = tmp_path / "anet"
    root.mkdir()
    train = {
        "v_QOlSCBRmfWY": {"duration": 82.73, "timestamps": [[0.83, 19.86], [17.37, 60.81]],
                          "sentences": ["A young woman is seen standing.", " She then begins to dance. "]},
        "v_ehGHCYKzyZ8": {"duration": 61.72, "timestamps": [[0, 10]], "sentences": ["A man plays drums."]},
    }
    val_1 = {"v_uqiMw7tQ1Cc": {"duration": 55.1, "timestamps": [[0, 5], [5, 9]], "sentences": ["A", "B."]}}
    (root / "train.json").write_text(json.dumps(train))
    (root / "val_1.json").write_text(json.dumps(val_1))
    (root / "val_2.json").write_text("{}")  # not used
    plain = touch(root / "videos" / "QOlSCBRmfWY.mkv")  # without the v_ prefix, other extension
    ann = load_annotations("activitynet", root)
    assert ann.split("train")[0] == Caption(
        "v_QOlSCBRmfWY", "v_QOlSCBRmfWY", "A young woman is seen standing. She then begins to dance.", "train")
    assert ann.split("test") == [Caption("v_uqiMw7tQ1Cc", "v_uqiMw7tQ1Cc", "A B.", "test")]
    assert ann.videos["v_QOlSCBRmfWY"] == plain
    assert ann.videos["v_ehGHCYKzyZ8"] == root / "videos" / "v_ehGHCYKzyZ8.mp4"
    assert default_slots("activitynet") == (64, 64) and default_slots("msrvtt") == (12, 32)
    (root / "val_1.json").write_text(json.dumps({"v_x": {"sentences": "not a list"}}))
    with pytest.raises(AnnotationError, match=r"val_1\.json: video 'v_x' has no 'sentences' list"):
        load_annotations("activitynet", root)


# --------------------------------------------------------------------------- DiDeMo


def test_didemo_paragraph_per_video(tmp_path):
    root = tmp_path / "didemo"
    root.mkdir()

    def moment(video, text, ann_id):
        return {"video": video, "description": text, "times": [[0, 0], [0, 1]], "annotation_id": ann_id,
                "dl_link": "https://example.invalid/x"}

    a, b = "10015567@N08_3655084291_d8b58466fa.mov", "27616128@N00_4391446017_5a0fc7a5d2.avi"
    (root / "train_data.json").write_text(json.dumps([moment(a, "a dog runs", 1), moment(a, "the dog stops", 2)]))
    (root / "test_data.json").write_text(json.dumps([moment(b, "kids play", 3)]))
    mp4 = touch(root / "videos" / "10015567@N08_3655084291_d8b58466fa.mp4")  # re-encoded copy
    ann = load_annotations("didemo", root)
    assert ann.split("train") == [Caption(a, a, "a dog runs the dog stops", "train")]
    assert ann.split("test") == [Caption(b, b, "kids play", "test")]
    assert ann.videos[a] == mp4 and ann.videos[b] == root / "videos" / b
    (root / "val_data.json").write_text(json.dumps([moment(b, "again", 4)]))
    with pytest.raises(AnnotationError, match="is also in the val split"):
        load_annotations("didemo", root)


# --------------------------------------------------------------------------- generic manifest


def test_manifest_csv_and_jsonl(tmp_path):
    root = tmp_path / "own"
    root.mkdir()
    (root / "manifest.csv").write_text(
        "video,caption,split\n"
        "clips/a.mp4,a dog runs on a beach,train\n"
        "clips/a.mp4,\"a dog, on the sand\",train\n"
        "/abs/b.mkv,a man cooks pasta,TEST\n"
    )
    ann = load_annotations("manifest", root)  # the folder: finds manifest.csv
    assert ann.captions == [
        Caption("clips/a.mp4#0", "clips/a.mp4", "a dog runs on a beach", "train"),
        Caption("clips/a.mp4#1", "clips/a.mp4", "a dog, on the sand", "train"),
        Caption("/abs/b.mkv#0", "/abs/b.mkv", "a man cooks pasta", "test"),
    ]
    assert ann.videos == {"clips/a.mp4": root / "clips" / "a.mp4", "/abs/b.mkv": Path("/abs/b.mkv")}
    assert load_annotations("manifest", root, video_dir="/media").videos["clips/a.mp4"] == Path("/media/clips/a.mp4")

    jsonl = root / "mine.jsonl"
    jsonl.write_text(
        json.dumps({"path": "x.mp4", "text": "first", "split": "train", "video_id": "x"}) + "\n\n"
        + json.dumps({"path": "x.mp4", "text": "second", "split": "train", "video_id": "x", "caption_id": "c2"}) + "\n"
    )
    ann = load_annotations("manifest", jsonl)  # a file, with the accepted aliases
    assert [(c.caption_id, c.video_id, c.text) for c in ann.captions] == [("x#0", "x", "first"), ("c2", "x", "second")]


@pytest.mark.parametrize("text, message", [
    ("video,caption\na.mp4,x\n", r"manifest\.csv line 1: missing column split"),
    ("video,caption,split\na.mp4,x,dev\n", r"manifest\.csv line 2: split 'dev' is not one of train, val, test"),
    ("video,caption,split\na.mp4,,train\n", r"manifest\.csv line 2: missing or empty caption"),
    ("video,caption,split\na.mp4,x,train\na.mp4,y,test\n", "has captions in both train and test"),
    ("video,caption,split,video_id\na.mp4,x,train,v\nb.mp4,y,train,v\n", "video id 'v' names two files"),
    ("video,caption,split\n", "no captions"),
])
def test_manifest_errors_name_file_and_line(tmp_path, text, message):
    (tmp_path / "manifest.csv").write_text(text)
    with pytest.raises(AnnotationError, match=message) as e:
        load_annotations("manifest", tmp_path / "manifest.csv")
    assert "\n" not in str(e.value)


def test_manifest_jsonl_bad_line(tmp_path):
    (tmp_path / "m.jsonl").write_text('{"video": "a.mp4", "caption": "x", "split": "train"}\n{oops\n')
    with pytest.raises(AnnotationError, match=r"m\.jsonl line 2: invalid JSON"):
        load_annotations("manifest", tmp_path / "m.jsonl")
    with pytest.raises(FileNotFoundError, match="exactly one of manifest.csv, manifest.jsonl"):
        load_annotations("manifest", tmp_path)


# --------------------------------------------------------------------------- one dataset's loader on another's files


def _every_dataset(tmp: Path) -> dict[str, Path]:
    """A minimal folder of each dataset in its own format (and the manifest's)."""
    from tiny_msrvtt import write_msrvtt

    roots = {"msvd": write_msvd(tmp / "msvd"), "msrvtt": write_msrvtt(tmp / "msrvtt", {"v0": ["a"]}, [("k", "v1", "b")], {})}
    for name, files in {
        "lsmdc": {"LSMDC16_annos_training.csv": LSMDC_TRAIN, "LSMDC16_challenge_1000_publictect.csv": LSMDC_TEST},
        "activitynet": {f: json.dumps({f"v_{f[0]}": {"duration": 1, "timestamps": [[0, 1]], "sentences": ["x"]}})
                        for f in ("train.json", "val_1.json")},
        "didemo": {f"{s}_data.json": json.dumps([{"video": f"{s}.mp4", "description": "d", "times": [[0, 1]],
                                                  "annotation_id": i}]) for i, s in enumerate(("train", "test"))},
        "manifest": {"manifest.csv": "video,caption,split\na.mp4,x,train\nb.mp4,y,test\n"},
    }.items():
        (tmp / name).mkdir()
        for f, text in files.items():
            (tmp / name / f).write_text(text)
        roots[name] = tmp / name
    return roots


def test_each_loader_on_another_datasets_files_names_what_is_missing(tmp_path):
    roots = _every_dataset(tmp_path)
    assert set(roots) == set(dataset_names())
    wants = {"msrvtt": "MSRVTT_data.json", "msvd": "raw-captions.pkl", "lsmdc": "LSMDC16_annos_training.csv",
             "activitynet": "train.json", "didemo": "train_data.json", "manifest": "manifest.csv"}
    for name in dataset_names():
        assert load_annotations(name, roots[name]).captions  # its own files load
        for other, root in roots.items():
            if other == name:
                continue
            with pytest.raises(FileNotFoundError) as e:
                load_annotations(name, root)
            msg = str(e.value)
            assert "\n" not in msg and wants[name] in msg and str(root) in msg, (name, other, msg)
    # through the command: one `Error:` line, exit 1, before any work (no --out folder made)
    from conftest import run_cli

    r = run_cli("extract", "--dataset", "msvd", "--data-root", roots["msrvtt"], "--out", tmp_path / "cache",
                "--model", "tiny", "--pretrained", "none", ok=False)
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert r.exit_code == 1 and len(lines) == 1 and lines[0].startswith("Error: "), r.output
    assert "raw-captions.pkl" in " ".join(r.output.split()) and not (tmp_path / "cache").exists()
