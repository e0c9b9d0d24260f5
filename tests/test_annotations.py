"""MSRVTT annotation loading on hand-written miniature files."""
import json
import re
from pathlib import Path

import pytest

from diffret.extract.annotations import (
    AnnotationError,
    Annotations,
    Caption,
    load_annotations,
    load_msrvtt,
)

SENTENCES = [  # 3 videos, 7 sentences, interleaved as in the real json
    ("video0", "a man is talking"),
    ("video1", "a cat plays piano"),
    ("video0", "someone speaks to the camera"),
    ("video2", "cars race on a track"),
    ("video1", "a kitten on a keyboard"),
    ("video0", "a man in a suit talks"),
    ("video2", "a race, with cars"),
]


def write_msrvtt(root: Path, *, videos_dir: bool = False) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    data = {
        "videos": [{"video_id": f"video{i}", "category": i, "split": "train"} for i in range(3)],
        "sentences": [{"video_id": v, "caption": c, "sen_id": i} for i, (v, c) in enumerate(SENTENCES)],
    }
    (root / "MSRVTT_data.json").write_text(json.dumps(data))
    (root / "MSRVTT_train.9k.csv").write_text("video_id\nvideo1\nvideo0\n")
    (root / "MSRVTT_JSFUSION_test.csv").write_text(
        "key,vid_key,video_id,sentence\nret0,msr2,video2,\"a race, with cars\"\n"
    )
    if videos_dir:
        (root / "videos").mkdir()
    return root


def test_msrvtt_captions_and_splits(tmp_path):
    ann = load_msrvtt(write_msrvtt(tmp_path / "msrvtt"))
    assert isinstance(ann, Annotations) and ann.dataset == "msrvtt"
    train = ann.split("train")
    # every caption of the train videos, in json order, numbered within each video
    assert [c.caption_id for c in train] == ["video0#0", "video1#0", "video0#1", "video1#1", "video0#2"]
    assert train[2] == Caption("video0#1", "video0", "someone speaks to the camera", "train")
    assert {c.split for c in train} == {"train"}
    assert ann.split("test") == [Caption("ret0", "video2", "a race, with cars", "test")]
    assert ann.video_ids("train") == ["video0", "video1"]  # first appearance among captions
    assert ann.video_ids("test") == ["video2"]
    assert len(ann.captions) == 6 and len({c.caption_id for c in ann.captions}) == 6
    assert ann.split("val") == [] and ann.splits() == ["train", "test"]
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        ann.split("dev")


def test_msrvtt_video_paths_flat_and_videos_dir(tmp_path):
    flat = load_msrvtt(write_msrvtt(tmp_path / "flat"))
    assert flat.videos == {v: tmp_path / "flat" / f"{v}.mp4" for v in ("video0", "video1", "video2")}

    nested = load_msrvtt(write_msrvtt(tmp_path / "nested", videos_dir=True))
    assert nested.videos["video2"] == tmp_path / "nested" / "videos" / "video2.mp4"
    assert set(nested.videos) == {"video0", "video1", "video2"}

    custom = load_msrvtt(tmp_path / "nested", video_dir="clips")
    assert custom.videos["video0"] == tmp_path / "nested" / "clips" / "video0.mp4"
    absolute = load_msrvtt(tmp_path / "nested", video_dir=str(tmp_path / "elsewhere"))
    assert absolute.videos["video1"] == tmp_path / "elsewhere" / "video1.mp4"


def test_only_referenced_videos_are_listed(tmp_path):
    root = write_msrvtt(tmp_path / "m")
    (root / "MSRVTT_train.9k.csv").write_text("video_id\nvideo1\n")
    ann = load_msrvtt(root)
    assert set(ann.videos) == {"video1", "video2"}  # video0 has captions but is in no split


def test_registry(tmp_path):
    root = write_msrvtt(tmp_path / "m")
    ann = load_annotations("msrvtt", str(root))
    assert ann.root == root and len(ann.split("train")) == 5
    assert load_annotations("MSRVTT", root).video_ids("test") == ["video2"]
    with pytest.raises(ValueError, match=r"^unknown dataset 'x'; known: msrvtt, msvd, lsmdc, activitynet, didemo, manifest$"):
        load_annotations("x", root)


def test_missing_root(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_msrvtt(tmp_path / "nope")


@pytest.mark.parametrize("name", ["MSRVTT_data.json", "MSRVTT_train.9k.csv", "MSRVTT_JSFUSION_test.csv"])
def test_missing_file(tmp_path, name):
    root = write_msrvtt(tmp_path / "m")
    (root / name).unlink()
    with pytest.raises(FileNotFoundError, match=name.replace(".", r"\.")):
        load_msrvtt(root)


def test_malformed_json_names_file_and_line(tmp_path):
    root = write_msrvtt(tmp_path / "m")
    (root / "MSRVTT_data.json").write_text('{"sentences": [\n  {"video_id": "video0",\n  oops}\n]}')
    with pytest.raises(AnnotationError, match=r"MSRVTT_data\.json line 3") as e:
        load_msrvtt(root)
    assert "\n" not in str(e.value)


def test_json_wrong_structure(tmp_path):
    root = write_msrvtt(tmp_path / "m")
    (root / "MSRVTT_data.json").write_text(json.dumps({"sentences": [{"video_id": "video0"}]}))
    with pytest.raises(AnnotationError, match=r"MSRVTT_data\.json: sentences\[0\].*'caption'"):
        load_msrvtt(root)
    (root / "MSRVTT_data.json").write_text("[]")
    with pytest.raises(AnnotationError, match=r"MSRVTT_data\.json: expected .*'sentences'"):
        load_msrvtt(root)


def test_csv_missing_column(tmp_path):
    root = write_msrvtt(tmp_path / "m")
    (root / "MSRVTT_JSFUSION_test.csv").write_text("key,vid_key,video\nret0,msr2,video2\n")
    with pytest.raises(AnnotationError, match=r"MSRVTT_JSFUSION_test\.csv line 1: missing column 'video_id', 'sentence'"):
        load_msrvtt(root)
    (root / "MSRVTT_JSFUSION_test.csv").write_text("")
    with pytest.raises(AnnotationError, match=r"MSRVTT_JSFUSION_test\.csv line 1: empty file"):
        load_msrvtt(root)


def test_csv_bad_row_names_line(tmp_path):
    root = write_msrvtt(tmp_path / "m")
    (root / "MSRVTT_JSFUSION_test.csv").write_text(
        "key,vid_key,video_id,sentence\nret0,msr2,video2,cars\nret1,msr1,video1\n"
    )
    with pytest.raises(AnnotationError, match=r"MSRVTT_JSFUSION_test\.csv line 3: .*sentence"):
        load_msrvtt(root)


def test_train_video_without_captions(tmp_path):
    root = write_msrvtt(tmp_path / "m")
    (root / "MSRVTT_train.9k.csv").write_text("video_id\nvideo0\nvideo9\n")
    with pytest.raises(AnnotationError, match=r"MSRVTT_train\.9k\.csv line 3: video 'video9' has no captions"):
        load_msrvtt(root)


def test_duplicate_test_key(tmp_path):
    root = write_msrvtt(tmp_path / "m")
    (root / "MSRVTT_JSFUSION_test.csv").write_text(
        "key,vid_key,video_id,sentence\nret0,msr2,video2,a\nret0,msr1,video1,b\n"
    )
    with pytest.raises(AnnotationError, match="duplicate caption id 'ret0'"):
        load_msrvtt(root)


@pytest.mark.parametrize("entry, words", [("not an object", "is not an object"),
                                          ({"caption": "a dog"}, "has no string 'video_id'"),
                                          ({"video_id": "v1", "caption": 3}, "(video v1) has no string 'caption'")])
def test_malformed_msrvtt_sentence_is_named(tmp_path, entry, words):
    from diffret.extract.annotations.msrvtt import _msrvtt_sentences

    path = tmp_path / "MSRVTT_data.json"
    path.write_text(json.dumps({"sentences": [{"video_id": "v0", "caption": " ok "}, entry]}))
    with pytest.raises(AnnotationError, match=rf"sentences\[1\] {re.escape(words)}"):
        _msrvtt_sentences(path)
    path.write_text(json.dumps({"sentences": [{"video_id": " v0 ", "caption": " ok "}]}))
    assert _msrvtt_sentences(path) == [("v0", "ok")]  # both stripped


@pytest.mark.parametrize("entry, words", [(7, "is not an object"), ({"description": "x"}, "has no string 'video'"),
                                          ({"video": "a.mp4", "description": None},
                                           "(video a.mp4) has no string 'description'")])
def test_malformed_didemo_moment_is_named(tmp_path, entry, words):
    from diffret.extract.annotations.paragraphs import _didemo_split

    path = tmp_path / "train_data.json"
    path.write_text(json.dumps([{"video": "a.mp4", "description": "fine"}, entry]))
    with pytest.raises(AnnotationError, match=rf"entry 1 {re.escape(words)}"):
        _didemo_split(path)
    path.write_text(json.dumps([{"video": " a.mp4 ", "description": " kept as written "}]))
    assert _didemo_split(path) == [("a.mp4", " kept as written ")]  # the id stripped, the text as written
