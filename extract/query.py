"""Encoding free-text queries with a cache's own stage-1 model (its `stage1.pt`).

A query is encoded exactly as `extract` dumps a caption (dump.dump_texts): the text tower and the
word-weight head of the saved model, the cache's word slots L, and the tensors rounded to the
cache's float16, so a query's WTI score against a cached video equals what `evaluate` computes for
the same caption from the cache. Only the text tower runs; no video is decoded.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .backbone import get_tokenizer
from .checkpoint import load_stage1

SOS, EOT = "[SOS]", "[EOT]"  # how the two special positions are named in a query's word list


@dataclass
class EncodedQueries:
    """Queries as the cache stores captions; arrays float16 except the mask (bool)."""

    sentence: np.ndarray  # [n, D] EOT feature
    words: np.ndarray  # [n, L, D] word tokens, padded
    word_mask: np.ndarray  # [n, L] bool
    word_logits: np.ndarray  # [n, L] word-weight logits
    tokens: list[list[str]]  # the valid positions of each query as text ([SOS], pieces..., [EOT])
    truncated: list[bool]  # the query had more tokens than the L - 2 slots hold (the rest was dropped)

    def __len__(self) -> int:
        return len(self.tokens)


def _piece(tokenizer, token_id: int) -> str:
    """One BPE token as text (open_clip's SimpleTokenizer; else its id)."""
    decoder = getattr(tokenizer, "decoder", None)
    byte_decoder = getattr(tokenizer, "byte_decoder", None)
    if decoder is None or token_id not in decoder:
        return str(token_id)
    text = decoder[token_id]
    if byte_decoder is not None:
        text = bytearray(byte_decoder.get(c, 32) for c in text).decode("utf-8", errors="replace")
    return text.replace("</w>", "").strip() or text


class QueryEncoder:
    """The text side of a stage-1 checkpoint: `encode(texts)` -> EncodedQueries.

    stage1: path of a cache's stage1.pt; words: the cache's word slots L (its manifest's n_words).
    """

    def __init__(self, stage1: Path, words: int, device: str | torch.device = "cpu"):
        model, _, self.fingerprint, saved = load_stage1(Path(stage1))
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.words = int(words)
        self.tokenizer = get_tokenizer(saved["model"])
        self.sot = getattr(self.tokenizer, "sot_token_id", None)
        self.eot = getattr(self.tokenizer, "eot_token_id", None)

    def count_tokens(self, text: str) -> int:
        """The BPE tokens of `text` without [SOS] / [EOT] (the slots it would need: this + 2)."""
        encode = getattr(self.tokenizer, "encode", None)
        return len(encode(text)) if encode is not None else 0

    @torch.no_grad()
    def encode(self, texts: list[str], batch_size: int = 256) -> EncodedQueries:
        tokens = self.tokenizer(list(texts), context_length=self.words)  # [n, L]: truncated with [EOT] last
        parts = []
        for s in range(0, len(texts), batch_size):
            out = self.model.encode_text(tokens[s:s + batch_size].to(self.device))
            parts.append({k: v.float().cpu().numpy().astype(np.float16) if k != "word_mask" else v.cpu().numpy()
                          for k, v in out.items()})
        cat = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        pieces, truncated = [], []
        for i, text in enumerate(texts):
            ids = [int(t) for t in tokens[i] if int(t) != 0]
            pieces.append([SOS if t == self.sot else EOT if t == self.eot else _piece(self.tokenizer, t) for t in ids])
            truncated.append(self.count_tokens(text) > self.words - 2)
        return EncodedQueries(cat["sentence"], cat["words"], cat["word_mask"].astype(bool), cat["word_logits"],
                              pieces, truncated)


def keep_stage1(src: Path, out: Path) -> Path:
    """Put the checkpoint `src` into the cache folder `out` as stage1.pt (a hard link where the file
    system allows, else a copy; atomic), so that a cache dumped with `extract --stage1` holds the
    model its queries are encoded with. -> the cache's stage1.pt."""
    import os
    import shutil

    from diffret.cache.atomic import atomic_write
    from diffret.cache.layout import STAGE1_FILE

    src, dest = Path(src).resolve(), Path(out) / STAGE1_FILE
    if dest.exists() and dest.samefile(src):
        return dest
    Path(out).mkdir(parents=True, exist_ok=True)

    def write(tmp: Path) -> None:
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)

    atomic_write(dest, write)
    return dest
