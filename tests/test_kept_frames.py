"""Training frames decoded once and kept in memory (extract/data.py KeptClips, `--keep-frames`): the
same batches, losses and weights as decoding them again in every epoch, failures recorded alike."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from diffret.extract.backbone import get_tokenizer
from diffret.extract.config import ExtractConfig
from diffret.extract.data import KeptClips, kept_clips
from diffret.extract.finetune import finetune
from diffret.extract.video import FrameSpec
from tiny_stage1 import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

SPEC = FrameSpec(n_frames=4, size=32, target_fps=None)


def pairs(demo_root, tmp_path):
    """Each of 6 demo videos under two captions, plus a caption of a missing file."""
    videos = sorted((demo_root / "videos").glob("*.mp4"))[:6]
    paths = [p for p in videos for _ in range(2)] + [tmp_path / "missing.mp4"]
    texts = [f"caption {i} of a clip" for i in range(len(paths))]
    return get_tokenizer("tiny")(texts, context_length=16), paths


def train(tokens, paths, keep: float) -> tuple[list, dict, dict]:
    cfg = replace(ExtractConfig(dataset="msrvtt", data_root=".", model="tiny", pretrained="none", recipe="modern"),
                  epochs=2, batch_size=4, lr=1e-3, clip_lr_scale=1.0, workers=0, words=16, frames=4, keep_frames=keep)
    model, failures = tiny_model(frames=4), {}
    history = finetune(model, tokens, paths, SPEC, cfg, torch.device("cpu"), failures=failures, log=lambda *a: None)
    return history, model.state_dict(), failures


def test_kept_frames_train_exactly_as_decoding_every_epoch(demo_root, tmp_path):
    tokens, paths = pairs(demo_root, tmp_path)
    kept_h, kept_w, kept_f = train(tokens, paths, keep=4.0)
    dec_h, dec_w, dec_f = train(tokens, paths, keep=0.0)
    assert len(kept_h) == 2 and kept_h == dec_h
    assert kept_w.keys() == dec_w.keys() and all(torch.equal(kept_w[k], dec_w[k]) for k in kept_w)
    assert set(kept_f) == set(dec_f) == {str(tmp_path / "missing.mp4")}


def test_kept_clips_decode_each_video_once_and_only_when_they_fit(demo_root, tmp_path):
    tokens, paths = pairs(demo_root, tmp_path)
    need = KeptClips.nbytes(7, SPEC)
    assert kept_clips(paths, SPEC, 0, 0, None) is None
    assert kept_clips(paths, SPEC, 0.99 * need / 2 ** 30, 0, None) is None
    kept = kept_clips(paths, SPEC, need / 2 ** 30, 0, None)
    assert kept.frames.shape == (7, 4, 3, 32, 32) and kept.row.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6]
    frames, mask, idx, reasons = next(kept.batches([[1, 2, 12]]))
    assert idx.tolist() == [1, 2, 12] and mask[:2].all() and not mask[2].any() and reasons[2] and not reasons[0]
    assert torch.equal(frames[0], kept.frames[0]) and frames[2].eq(0).all()


@pytest.mark.slow
def test_stage1_epochs_benchmark_runs(demo_root, tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "stage1_epochs.py"
    out = tmp_path / "r.json"
    subprocess.run([sys.executable, str(script), "--data", str(demo_root), "--epochs", "1", "--json", str(out)],
                   check=True, capture_output=True)
    r = json.loads(out.read_text())
    assert r["seconds_per_epoch"]["kept"] > 0 and r["seconds_per_epoch"]["decoded"] > 0 and r["speedup"] > 0


def test_finetune_trains_in_train_mode_whatever_mode_the_model_arrives_in(demo_root, tmp_path, monkeypatch):
    import diffret.extract.finetune as ft

    modes, step = [], ft.train_step
    monkeypatch.setattr(ft, "train_step", lambda net, model, *a: modes.append(model.training) or step(net, model, *a))
    tokens, paths = pairs(demo_root, tmp_path)
    cfg = replace(ExtractConfig(dataset="msrvtt", data_root=".", model="tiny", pretrained="none", recipe="modern"),
                  epochs=1, batch_size=4, lr=1e-3, clip_lr_scale=1.0, workers=0, words=16, frames=4)
    model = tiny_model(frames=4).eval()
    finetune(model, tokens, paths, SPEC, cfg, torch.device("cpu"), log=lambda *a: None)
    assert modes and all(modes) and not model.training  # trained in train mode, handed back in eval mode


def test_stage1_validation_keeps_its_videos_through_kept_clips(demo_root, tmp_path, monkeypatch):
    """pipeline/selection.py Stage1Validation: kept (one decoding pass, KeptClips) or decoded at every
    validation, the same metrics."""
    import diffret.extract.data as data
    from diffret.pipeline.selection import Stage1Validation

    videos = sorted((demo_root / "videos").glob("*.mp4"))[:5]
    tokens = get_tokenizer("tiny")([f"caption {i}" for i in range(5)], context_length=16)
    cfg = replace(ExtractConfig(dataset="msrvtt", data_root=".", model="tiny", pretrained="none"),
                  batch_size=2, workers=0, words=16, frames=4)
    model = tiny_model(frames=4).eval()
    decoded = []
    loader = data.video_loader
    monkeypatch.setattr(data, "video_loader", lambda paths, *a, **k: decoded.append(len(paths)) or loader(paths, *a, **k))
    kept = Stage1Validation(tokens, torch.arange(5), videos, SPEC, cfg, "cpu")
    again = Stage1Validation(tokens, torch.arange(5), videos, SPEC, cfg, "cpu", keep_bytes=0)
    first = kept({"model": model})
    assert kept({"model": model}) == first and decoded == [5]  # decoded once, for the first validation
    assert again({"model": model}) == first and again({"model": model}) == first and decoded == [5, 5, 5]
