"""OpenAI's CLIP weights run with QuickGELU through every path (the `openai` tag, a local OpenAI
file, a `*-quickgelu` name, the stage1.pt rebuild, the temporal blocks), and the activation is
recorded in stage1.pt and the manifest and is part of the fingerprint. No downloads: random
weights in OpenAI's layouts stand in for the real files."""
from __future__ import annotations

import json

import open_clip
import pytest
import torch
from open_clip.transformer import QuickGELU
from torch import nn

from conftest import run_cli
from diffret.extract.backbone import (
    BackboneError, activation_of, build_clip, choose_activation, get_tokenizer, is_openai_file, is_torchscript_archive,
)
from diffret.extract.checkpoint import (
    CheckpointError, build_stage1, load_stage1, read_stage1, recorded_activation, save_stage1,
)
from diffret.extract.config import ExtractConfig
from diffret.extract.model import Stage1Model, fingerprint

OPENAI_EXTRAS = {"input_resolution": torch.tensor(32), "context_length": torch.tensor(32),
                 "vocab_size": torch.tensor(49408)}


def mlp_activations(module: nn.Module) -> set[type]:
    """The activation classes of every transformer MLP under `module`."""
    return {type(m.gelu) for m in module.modules() if isinstance(m, nn.Sequential) and hasattr(m, "gelu")}


def assert_quick_everywhere(model: Stage1Model) -> None:
    assert mlp_activations(model.clip.visual) == {QuickGELU}
    assert mlp_activations(model.clip.transformer) == {QuickGELU}
    assert mlp_activations(model.temporal) == {QuickGELU}
    assert not any(isinstance(m, nn.GELU) for m in model.modules())
    assert activation_of(model) == "quick_gelu"


def openai_tiny_state(seed: int = 0) -> dict:
    """A random tiny CLIP state dict in OpenAI's layout (its top-level metadata entries included)."""
    torch.manual_seed(seed)
    return {**build_clip("tiny", "none").state_dict(), **OPENAI_EXTRAS}


@pytest.fixture(scope="module")
def openai_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("openai") / "tiny-openai.pt"
    torch.save(openai_tiny_state(), path)
    return path


def test_the_decision_maps_name_and_weights_to_the_activation(tmp_path, openai_file):
    assert choose_activation("ViT-B-32", "openai") == "quick_gelu"  # open_clip 3 alone would say gelu
    assert choose_activation("ViT-B-32-quickgelu", "openai") == "quick_gelu"
    assert choose_activation("ViT-B-16", "openai") == "quick_gelu"
    assert choose_activation("ViT-B-32", "laion2b_s34b_b79k") == "gelu"  # trained with GELU
    assert choose_activation("ViT-B-32", "none") == "gelu"
    assert choose_activation("ViT-B-32-quickgelu", "none") == "quick_gelu"
    assert choose_activation("tiny", None) == "gelu"
    assert choose_activation("tiny", str(openai_file)) == "quick_gelu"
    plain = tmp_path / "plain.pt"  # open_clip's layout: follows the model name
    torch.save({k: v for k, v in openai_tiny_state().items() if k not in OPENAI_EXTRAS}, plain)
    assert choose_activation("tiny", str(plain)) == "gelu"
    wrapped = tmp_path / "wrapped.pt"  # under "state_dict", with DataParallel's "module." prefix
    torch.save({"state_dict": {f"module.{k}": v for k, v in openai_tiny_state().items()}}, wrapped)
    assert is_openai_file(wrapped) and choose_activation("tiny", str(wrapped)) == "quick_gelu"


@pytest.mark.parametrize("name", ["ViT-B-32", "ViT-B-32-quickgelu"])
@pytest.mark.slow
def test_the_openai_tag_builds_quick_gelu(monkeypatch, name):
    """The tag path asks open_clip for QuickGELU (the download itself is replaced: no network)."""
    real, calls = open_clip.create_model, []

    def no_download(model_name, pretrained=None, **kw):
        calls.append((model_name, pretrained, kw.get("force_quick_gelu")))
        return real(model_name, pretrained=None, **kw)

    monkeypatch.setattr(open_clip, "create_model", no_download)
    clip = build_clip(name, "openai")
    assert calls == [(name, "openai", True)]
    assert_quick_everywhere(Stage1Model(clip, max_frames=12))


@pytest.mark.slow
def test_a_local_openai_state_dict_builds_quick_gelu(tmp_path):
    """ViT-B-32 random weights saved with OpenAI's extra entries: recognised, loaded, QuickGELU
    in both towers and in the temporal blocks; the same file without them follows the name."""
    torch.manual_seed(5)
    source = build_clip("ViT-B-32", "none")
    assert activation_of(source) == "gelu"
    path = tmp_path / "ViT-B-32.pt"
    torch.save({**source.state_dict(), "input_resolution": torch.tensor(224), "context_length": torch.tensor(77),
                "vocab_size": torch.tensor(49408)}, path)
    loaded = build_clip("ViT-B-32", str(path))
    model = Stage1Model(loaded, max_frames=12)
    assert_quick_everywhere(model)
    want = source.state_dict()
    assert all(torch.equal(want[k], v) for k, v in loaded.state_dict().items())


def _torchscript_archive(state: dict, path) -> None:
    """A TorchScript archive whose module holds `state` (how OpenAI ships its .pt files)."""
    root = nn.Module()
    for key, value in state.items():
        *parents, leaf = key.split(".")
        mod = root
        for p in parents:
            if not hasattr(mod, p):
                mod.add_module(p, nn.Module())
            mod = getattr(mod, p)
        mod.register_buffer(leaf, value.clone())
    torch.jit.save(torch.jit.script(root), str(path))


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")
def test_a_torchscript_archive_is_recognised_and_builds_quick_gelu(tmp_path):
    state = openai_tiny_state(seed=3)
    path = tmp_path / "tiny-jit.pt"
    _torchscript_archive(state, path)
    plain = tmp_path / "plain.pt"
    torch.save({k: v for k, v in state.items() if k not in OPENAI_EXTRAS}, plain)
    assert is_torchscript_archive(path) and not is_torchscript_archive(plain)
    assert choose_activation("tiny", str(path)) == "quick_gelu"
    clip = build_clip("tiny", str(path))
    assert_quick_everywhere(Stage1Model(clip, max_frames=4))
    assert all(torch.equal(state[k], v) for k, v in clip.state_dict().items())
    assert activation_of(build_clip("tiny", str(plain))) == "gelu"


@pytest.mark.parametrize("activation", ["quick_gelu", "gelu"])
def test_random_temporal_blocks_get_clips_activation(activation):
    """5 temporal layers on a 4-layer text tower: the random-init branch, same activation as CLIP."""
    model = Stage1Model(build_clip("tiny", "none", activation=activation), max_frames=4, temporal_layers=5)
    assert len(model.temporal.blocks) == 5
    assert activation_of(model.temporal) == activation == activation_of(model.clip)


def test_an_explicit_activation_cannot_contradict_a_quickgelu_config():
    with pytest.raises(BackboneError, match="QuickGELU config"):
        build_clip("ViT-B-32-quickgelu", "none", activation="gelu")
    with pytest.raises(BackboneError, match="unknown activation"):
        build_clip("tiny", "none", activation="relu")


def _outputs(model: Stage1Model) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(7)
    frames = torch.randn(2, 4, 3, 32, 32, generator=g)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.bool)
    tokens = get_tokenizer("tiny")(["a dog runs on the beach", "two people cook"], context_length=16)
    with torch.no_grad():
        text, video = model.eval().encode_text(tokens), model.encode_video(frames, mask)
    return text["words"], text["word_logits"], video["frames"], video["frame_logits"], model.similarity(text, video)


@pytest.mark.slow
def test_a_stage1_rebuild_equals_the_model_that_wrote_it(tmp_path, openai_file):
    cfg = ExtractConfig(dataset="msrvtt", model="tiny", pretrained=str(openai_file), frames=4, words=16, epochs=0)
    model, _ = build_stage1(cfg)
    assert_quick_everywhere(model)
    with torch.no_grad():  # the temporal blocks and heads move away from their copies, as after training
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    fp = fingerprint(model)
    path = tmp_path / "stage1.pt"
    save_stage1(path, model, cfg, fp)
    assert read_stage1(path)["activation"] == "quick_gelu"

    rebuilt, _, fp2, _ = load_stage1(path)
    assert_quick_everywhere(rebuilt)
    assert fp2 == fp
    for a, b in zip(_outputs(model), _outputs(rebuilt)):
        assert torch.equal(a, b)

    # The same weights under plain GELU compute something else and fingerprint differently.
    gelu = Stage1Model(build_clip("tiny", "none", activation="gelu"), max_frames=4)
    gelu.load_state_dict(model.state_dict())
    assert activation_of(gelu) == "gelu" and fingerprint(gelu) != fp
    assert fingerprint(gelu, legacy=True) == fingerprint(model, legacy=True)
    assert not torch.allclose(_outputs(gelu)[2], _outputs(model)[2])


def test_a_recorded_activation_is_what_the_rebuild_runs(tmp_path):
    """The rebuild follows the file, not what the name would choose now: a recorded quick_gelu on
    the tiny config (whose name says gelu) comes back as quick_gelu."""
    cfg = ExtractConfig(dataset="msrvtt", model="tiny", pretrained="none", frames=4, words=16, epochs=0)
    model = Stage1Model(build_clip("tiny", "none", activation="quick_gelu"), max_frames=4)
    path = tmp_path / "stage1.pt"
    save_stage1(path, model, cfg, fingerprint(model))
    rebuilt, _, fp, _ = load_stage1(path)
    assert activation_of(rebuilt) == "quick_gelu" and fp == fingerprint(model)
    ckpt = torch.load(path, weights_only=False)
    ckpt["activation"] = "gelu"  # a file edited to claim another activation no longer verifies
    torch.save(ckpt, path)
    with pytest.raises(CheckpointError, match="damaged"):
        load_stage1(path)


def test_stage1_files_from_before_the_activation_was_recorded(tmp_path):
    cfg = ExtractConfig(dataset="msrvtt", model="tiny", pretrained="none", frames=4, words=16, epochs=0)
    model = Stage1Model(build_clip("tiny", "none"), max_frames=4)
    path = tmp_path / "stage1.pt"
    torch.save({"config": cfg.to_dict(), "fingerprint": fingerprint(model, legacy=True), "history": [],
                "state_dict": model.state_dict()}, path)  # the old layout: no "activation"
    rebuilt, _, fp, _ = load_stage1(path)
    assert activation_of(rebuilt) == "gelu" and fp == fingerprint(model)

    def old(model_name, pretrained):
        return {"config": {"model": model_name, "pretrained": pretrained}}

    assert recorded_activation(old("ViT-B-32-quickgelu", "openai"), "x") == "quick_gelu"
    assert recorded_activation(old("ViT-B-32", "/models/b32.pt"), "x") == "gelu"
    with pytest.raises(CheckpointError, match="predates recorded activations") as e:
        recorded_activation(old("ViT-B-32", "openai"), "old/stage1.pt")  # open_clip 2 and 3 disagree
    assert "\n" not in str(e.value)


def test_resuming_a_fine_tuning_under_another_activation_is_refused(tmp_path):
    from diffret.extract.checkpoint import read_train_state, restore_train_state, save_train_state

    def parts(activation):
        model = Stage1Model(build_clip("tiny", "none", activation=activation), max_frames=4)
        opt = torch.optim.AdamW(model.parameters())
        return model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0), torch.amp.GradScaler("cuda", enabled=False)

    cfg = ExtractConfig(dataset="msrvtt", model="tiny", pretrained="none", frames=4, words=16, epochs=2)
    path = tmp_path / "train-state.pt"
    save_train_state(path, *parts("quick_gelu"), 1, [0.5], cfg)
    assert read_train_state(path)["activation"] == "quick_gelu"
    assert restore_train_state(read_train_state(path), *parts("quick_gelu")) == (1, [0.5])
    with pytest.raises(CheckpointError, match="ran quick_gelu, this tiny model runs gelu"):
        restore_train_state(read_train_state(path), *parts("gelu"))


def _videos(demo_root, tmp_path):
    from diffret.extract.annotations import load_msrvtt
    from tiny_msrvtt import write_msrvtt

    ann = load_msrvtt(demo_root)
    train = {v: [next(c.text for c in ann.split("train") if c.video_id == v)] for v in ann.video_ids("train")[:2]}
    test = [(c.caption_id, c.video_id, c.text) for c in ann.split("test")[:2]]
    videos = {v: ann.videos[v] for v in list(train) + [v for _, v, _ in test]}
    return write_msrvtt(tmp_path / "data", train, test, videos)


@pytest.mark.slow
def test_extract_records_the_activation(demo_root, tmp_path, openai_file):
    """A dump from an OpenAI file: the manifest, stage1.pt and `cache info` say quick_gelu, and a
    second dump through --stage1 rebuilds the same model (same fingerprint, same activation)."""
    data = _videos(demo_root, tmp_path)
    flags = ["--frames", "4", "--words", "16", "--fps", "uniform", "--workers", "0", "--epochs", "0"]
    out = tmp_path / "cache"
    run_cli("extract", "--data-root", data, "--out", out, "--model", "tiny", "--pretrained", openai_file, *flags)
    manifest = json.loads((out / "manifest.json").read_text())
    ckpt = read_stage1(out / "stage1.pt")
    assert manifest["model"]["activation"] == ckpt["activation"] == "quick_gelu"
    assert manifest["model"]["fingerprint"] == ckpt["fingerprint"]
    info = json.loads(run_cli("cache", "info", out, "--json").output)
    assert info["activation"] == "quick_gelu"

    again = tmp_path / "again"
    run_cli("extract", "--data-root", data, "--out", again, "--stage1", out / "stage1.pt", *flags)
    second = json.loads((again / "manifest.json").read_text())["model"]
    assert (second["activation"], second["fingerprint"]) == ("quick_gelu", manifest["model"]["fingerprint"])
