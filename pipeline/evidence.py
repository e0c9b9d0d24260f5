"""Why a video matched a query: per-word best frames with their times, the heaviest frames.

From the same tensors WTI scores (the query's word tokens and weights, the video's frame tokens,
weights and decoded times) over the valid slots only:

    cos[i, j] = cos(w_i, f_j)         a = softmax of the word logits, b = softmax of the frame logits
    word i:   frame argmax_j cos[i, j], its time, that cosine, and its weight a_i
    frames:   the FRAMES frames of largest b_j (frame, time, weight)
    best_time: the time of argmax_j sum_i a_i cos[i, j], the frame with the largest word-weighted
               cosine mass: the thumbnail moment

A word's max runs over the video's valid frames (WTI's "zero" rule also lets a padded slot's 0 win
when every valid cosine is negative; evidence always names a real frame). Times are the cache's
`frame_times` (seconds in the source video); None where the cache has no time for that frame.
"""
from __future__ import annotations

import numpy as np

from diffret.cache.index import softmax_valid, unit

FRAMES = 3  # best frames listed per hit


def _time(times: np.ndarray, j: int) -> float | None:
    t = float(times[j])
    return round(t, 3) if t >= 0 else None


def evidence(words: np.ndarray, word_mask: np.ndarray, word_logits: np.ndarray, tokens: list[str],
             frames: np.ndarray, frame_mask: np.ndarray, frame_logits: np.ndarray,
             frame_times: np.ndarray) -> dict:
    """One query (words [L, D], word_mask [L], word_logits [L], `tokens`: the text of its valid
    positions) against one video (frames [F, D], frame_mask [F], frame_logits [F], frame_times [F])
    -> {"words": [...], "frames": [...], "best_time"} (JSON-safe; see the module docstring)."""
    wi = np.nonzero(word_mask)[0]
    fj = np.nonzero(frame_mask)[0]
    cos = unit(words[wi].astype(np.float32)) @ unit(frames[fj].astype(np.float32)).T  # [l, f]
    a, b = softmax_valid(word_logits, word_mask)[wi], softmax_valid(frame_logits, frame_mask)[fj]
    best = cos.argmax(axis=1)
    out_words = [{"word": tokens[n] if n < len(tokens) else "?", "weight": round(float(a[n]), 4),
                  "frame": int(fj[best[n]]), "time": _time(frame_times, int(fj[best[n]])),
                  "cosine": round(float(cos[n, best[n]]), 4)} for n in range(len(wi))]
    top = np.argsort(-b, kind="stable")[:FRAMES]
    out_frames = [{"frame": int(fj[j]), "time": _time(frame_times, int(fj[j])), "weight": round(float(b[j]), 4)}
                  for j in top]
    mass = a @ cos  # [f]
    return {"words": out_words, "frames": out_frames, "best_time": _time(frame_times, int(fj[int(mass.argmax())]))}
