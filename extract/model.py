"""The stage-1 model of DiffusionRet: CLIP towers, a temporal transformer, the WTI head.

    text  [B, L] token ids  -> word tokens [B, L, D] (all positions, projected), EOT = sentence
    video [B, F, 3, H, W]   -> per-frame CLS [B, F, D] -> temporal transformer (+ residual)
    head: word / frame weight logits from two MLPs (D -> 2D -> ReLU -> 1); score = WTI
    loss: symmetric InfoNCE on logit_scale * S (logit scale clamped at 100), or dual softmax
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from diffret.cache.wti import wti_similarity

from .backbone import act_layer, activation_of, text_tokens
from .config import FRAME_PADDINGS


class TemporalTransformer(nn.Module):
    """Transformer over per-frame features with frame position embeddings and a residual.

    Initialised from the first `layers` blocks of the CLIP text transformer and its positional
    embedding when their width matches the joint width (as the original); else random blocks
    with CLIP's activation (QuickGELU for OpenAI weights, as the original's temporal blocks).
    """

    def __init__(self, clip: nn.Module, width: int, max_frames: int, layers: int = 4, heads: int = 8):
        super().__init__()
        text_blocks = clip.transformer.resblocks
        self.frame_position_embeddings = nn.Embedding(max_frames, width)
        if clip.transformer.width == width and len(text_blocks) >= layers:
            self.blocks = nn.ModuleList(copy.deepcopy(text_blocks[i]) for i in range(layers))
            self.heads = text_blocks[0].attn.num_heads
            pos = clip.positional_embedding.detach()
            n = min(max_frames, pos.shape[0])
            with torch.no_grad():
                self.frame_position_embeddings.weight[:n] = pos[:n]
                if n < max_frames:  # frames beyond the text context (64 frames on a 32-token model)
                    nn.init.normal_(self.frame_position_embeddings.weight[n:], std=0.01)
        else:
            from open_clip.transformer import ResidualAttentionBlock

            act = act_layer(activation_of(clip.transformer))
            self.blocks = nn.ModuleList(ResidualAttentionBlock(width, heads, act_layer=act) for _ in range(layers))
            self.heads = heads
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x [B, F, D], mask [B, F] bool (True = real frame) -> [B, F, D]."""
        B, Fn, _ = x.shape
        h = x + self.frame_position_embeddings.weight[:Fn].to(x.dtype)
        # Additive key mask, one copy per head: padded frames are never attended to.
        bias = torch.zeros(B, 1, 1, Fn, dtype=x.dtype, device=x.device).masked_fill(~mask[:, None, None, :], -1e4)
        bias = bias.expand(B, self.heads, Fn, Fn).reshape(B * self.heads, Fn, Fn)
        for blk in self.blocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                h = checkpoint(blk, h, None, None, bias, use_reentrant=False)
            else:
                h = blk(h, attn_mask=bias)
        return h + x


def weight_mlp(width: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(width, 2 * width), nn.ReLU(inplace=True), nn.Linear(2 * width, 1))


class Stage1Model(nn.Module):
    """CLIP + temporal transformer + WTI head; produces exactly what the cache stores."""

    def __init__(self, clip: nn.Module, max_frames: int = 12, temporal_layers: int = 4,
                 frame_padding: str = "zero-frame"):
        super().__init__()
        if frame_padding not in FRAME_PADDINGS:
            raise ValueError(f"unknown frame padding {frame_padding!r}; known: {', '.join(FRAME_PADDINGS)}")
        self.frame_padding = frame_padding  # what padded frame slots hold (encode_video); not a weight
        self.clip = clip
        width = clip.text_projection.shape[1] if isinstance(clip.text_projection, torch.Tensor) else clip.embed_dim
        self.width = int(width)
        self.temporal = TemporalTransformer(clip, self.width, max_frames, layers=temporal_layers)
        self.text_weight_fc = weight_mlp(self.width)
        self.video_weight_fc = weight_mlp(self.width)

    @property
    def max_frames(self) -> int:
        return self.temporal.frame_position_embeddings.num_embeddings

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute the activations of every transformer block in backward (open_clip's switch)."""
        self.clip.set_grad_checkpointing(enable)
        self.temporal.grad_checkpointing = enable

    def forward(self, tokens: torch.Tensor, frames: torch.Tensor, mask: torch.Tensor):
        """Both towers at once (what DistributedDataParallel wraps): -> (encode_text, encode_video)."""
        return self.encode_text(tokens), self.encode_video(frames, mask)

    def new_modules(self) -> list[nn.Module]:
        """Modules that are not part of CLIP (trained at the full learning rate)."""
        return [self.temporal, self.text_weight_fc, self.video_weight_fc]

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.clip.logit_scale.exp().clamp(max=100.0)

    def encode_text(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        """tokens [B, L] -> sentence [B, D], words [B, L, D], word_mask [B, L], word_logits [B, L]."""
        words = text_tokens(self.clip, tokens).float()
        mask = tokens != 0
        eot = tokens.argmax(dim=-1)  # EOT has the largest id in CLIP's vocabulary
        sentence = words[torch.arange(len(tokens), device=tokens.device), eot]
        logits = self.text_weight_fc(words).squeeze(-1)
        return {"sentence": sentence, "words": words, "word_mask": mask, "word_logits": logits}

    def encode_video(self, frames: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """frames [B, F, 3, H, W] normalised, mask [B, F] bool -> frames [B, F, D], frame_logits [B, F].

        A padded slot's CLS feature: with frame_padding "zero-frame" (the original, whose padded
        video slots are all-zero tensors after normalisation) that of an all-zero frame [3, H, W],
        encoded once per call beside the real frames (padded slots' pixels are never encoded);
        with "zero-feature", zero. The temporal transformer never attends to padded slots, so
        real frames' outputs are the same either way; the padded slots' outputs (stored, masked,
        and part of the denoisers' softmax over frames) differ.
        """
        B, Fn = frames.shape[:2]
        if self.frame_padding == "zero-frame":
            n = int(mask.sum())
            both = torch.cat([frames[mask], frames.new_zeros(1, *frames.shape[2:])])  # [n + 1, 3, H, W]
            feats = self.clip.encode_image(both).float()
            cls = feats[n:].expand(B, Fn, -1).clone()
            cls[mask] = feats[:n]
        else:
            cls = self.clip.encode_image(frames.flatten(0, 1)).float().view(B, Fn, -1)
            cls = cls * mask[..., None]
        out = self.temporal(cls, mask)
        logits = self.video_weight_fc(out).squeeze(-1)
        return {"frames": out, "frame_mask": mask, "frame_logits": logits}

    @staticmethod
    def similarity(text: dict[str, torch.Tensor], video: dict[str, torch.Tensor],
                   padding: str = "zero") -> torch.Tensor:
        """WTI score matrix [Bt, Bv] between encoded texts and videos; padding: the WTI rule for padded
        pairs (zero | exclude, ExtractConfig.wti_padding)."""
        return wti_similarity(
            text["words"], text["word_mask"], text["word_logits"],
            video["frames"], video["frame_mask"], video["frame_logits"], padding=padding,
        )


def info_nce(sim: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE over a square score matrix [B, B] whose diagonal holds the positives."""
    logits = sim * logit_scale
    target = torch.arange(len(sim), device=sim.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2


def dual_softmax_loss(sim: torch.Tensor, logit_scale: torch.Tensor, temp: float = 1000.0) -> torch.Tensor:
    """The Dual Softmax training loss of CAMoE (Cheng et al. 2021) over a square score matrix [B, B].

    With logits Z = logit_scale * S (rows = texts, columns = videos), each direction re-weights
    its logits by a softmax over the *other* axis before the usual cross-entropy:

        t2v: Z'  = Z * softmax(Z / temp, over texts, per video) * B;     CE over each row of Z'
        v2t: Z'' = Z^T * softmax(Z^T / temp, over videos, per text) * B; CE over each row of Z''
        loss = (mean_t2v + mean_v2t) / 2

    `temp` divides (1000 as in CAMoE's code), so the prior is a mild one; the factor B keeps the
    weights near 1.
    """
    logits = sim * logit_scale
    target = torch.arange(len(sim), device=sim.device)
    n = len(sim)

    def one_way(z: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(z * torch.softmax(z / temp, dim=0) * n, target)

    return (one_way(logits) + one_way(logits.t())) / 2


def contrastive_loss(sim: torch.Tensor, logit_scale: torch.Tensor, kind: str = "infonce", dsl_temp: float = 1000.0):
    """The stage-1 training loss by name: "infonce" (the original) or "dsl"."""
    if kind == "infonce":
        return info_nce(sim, logit_scale)
    if kind == "dsl":
        return dual_softmax_loss(sim, logit_scale, dsl_temp)
    raise ValueError(f"unknown loss {kind!r}; known: infonce, dsl")


def fingerprint(model: nn.Module, legacy: bool = False) -> str:
    """sha256 over the state dict (names, shapes, bytes) and the activation (`activation_of`, read
    from the modules): identifies the exact stage-1 model. `legacy`: the weights alone (how
    stage1.pt files written before the activation was recorded were fingerprinted)."""
    import hashlib

    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    if not legacy:
        h.update(f"activation={activation_of(model)}".encode())
    return h.hexdigest()[:16]
