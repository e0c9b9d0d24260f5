"""Real weights stay loadable: a local checkpoint path, and a clear error when a tag cannot be fetched."""
from __future__ import annotations

import pytest
import torch

from diffret.extract.backbone import BackboneError, activation_of, build_clip, get_tokenizer, image_size
from diffret.extract.model import Stage1Model


@pytest.mark.slow
def test_vit_b32_from_a_local_checkpoint(tmp_path):
    """A randomly initialised ViT-B-32 saved to disk comes back through --pretrained PATH."""
    torch.manual_seed(123)
    source = build_clip("ViT-B-32", "none")
    path = tmp_path / "vit-b-32-random.pt"
    torch.save(source.state_dict(), path)
    torch.manual_seed(999)  # a different random init, so equality can only come from the file
    loaded = build_clip("ViT-B-32", str(path))
    for (name, a), b in zip(source.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
    # open_clip's layout (no OpenAI metadata entries): the activation follows the model name.
    assert activation_of(loaded) == "gelu"

    model = Stage1Model(loaded, max_frames=12).eval()
    assert model.width == 512 and image_size(loaded) == 224
    # The temporal transformer starts from the first 4 text blocks, as the original.
    assert torch.equal(model.temporal.blocks[3].mlp.c_fc.weight, loaded.transformer.resblocks[3].mlp.c_fc.weight)
    frames = torch.randn(1, 2, 3, 224, 224)
    mask = torch.ones(1, 2, dtype=torch.bool)
    tokens = get_tokenizer("ViT-B-32")(["a dog runs on the beach"], context_length=32)
    with torch.no_grad():
        video = model.encode_video(frames, mask)
        text = model.encode_text(tokens)
        sim = model.similarity(text, video)
    assert video["frames"].shape == (1, 2, 512) and video["frame_logits"].shape == (1, 2)
    assert text["words"].shape == (1, 32, 512) and text["sentence"].shape == (1, 512)
    assert text["word_mask"].sum() == 8  # [SOS] + 6 words + [EOT]
    assert sim.shape == (1, 1) and torch.isfinite(sim).all()
    # The EOT output is CLIP's own sentence embedding.
    with torch.no_grad():
        full = get_tokenizer("ViT-B-32")(["a dog runs on the beach"])  # 77 positions
        assert torch.allclose(text["sentence"], loaded.encode_text(full), atol=1e-4)


def test_missing_checkpoint_file_is_a_clear_error(tmp_path):
    with pytest.raises(BackboneError, match="does not exist"):
        build_clip("tiny", str(tmp_path / "missing.pt"))


def test_a_tag_that_cannot_be_fetched_says_how_to_pass_a_file(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(BackboneError, match="--pretrained /path/to/weights.pt") as e:
        build_clip("ViT-B-32", "openai")
    assert "\n" not in str(e.value)


def test_unknown_tag_and_model():
    with pytest.raises(BackboneError, match="no pretrained tag"):
        build_clip("tiny", "openai")
    with pytest.raises(BackboneError, match="unknown open_clip model"):
        build_clip("ViT-Z-99", "none")
