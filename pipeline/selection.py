"""Checkpoint selection on a validation split (`--select-on val`), for both stages.

The original picked its reported checkpoint by R@1 on the *test* split (main_retrieval.py evaluates
raw and EMA weights every 150 steps and keeps `best.pth`); diffret picks it on a validation split and
never reads the test split while training. The validation split: the dataset's own where it has one
(MSVD, LSMDC, DiDeMo; for stage two, the cache's `val` split), else a seeded `--val-fraction` of the
training videos, held out from training (cache/manifest.py `held_out_videos`) and recorded (the
cache's manifest, the generator's generator.json).

One `Selector` serves both trainers, which call it through three methods (extract/ and generator/
never import this module: pipeline hands the selector in):

    step(global_step, epoch, candidates)        validates when global_step % eval_every == 0
    epoch_end(global_step, epoch, candidates)   validates at each epoch's end
    candidates() -> {"raw": {name: module}, "ema": {name: module}}   the weights to compare

Each validation scores every candidate by t2v R@1 (pipeline/metrics.py, the multi-caption protocol)
and keeps a CPU copy of the best: as the original, a later evaluation wins a tie and the raw weights
win a tie with the EMA. `state_dict()` goes into the trainer's per-epoch commit, so `--resume`
continues with the best so far; `best_state()` is what the trainer saves as its model in the end.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from diffret.cache.manifest import held_out_videos
from diffret.cache.wti import wti_similarity_chunked

from .metrics import retrieval_metrics

METRIC = ("t2v", "R@1")  # what decides: t2v R@1 on the validation split


class Selector:
    """Keeps the best weights by validation t2v R@1. evaluate(modules) -> retrieval_metrics dict."""

    def __init__(self, evaluate: Callable[[dict], dict], eval_every: int, log=print, record: dict | None = None):
        self.evaluate, self.eval_every, self.log = evaluate, int(eval_every), log
        self.record = dict(record or {})  # the validation split (source, ids), reported in summary()
        self.best: dict | None = None  # {"state": {name: state dict on the CPU}, "record": {...}}
        self.evaluations: list[dict] = []

    def step(self, global_step: int, epoch: int, candidates: Callable[[], dict]) -> None:
        if global_step % self.eval_every == 0:
            self._validate(global_step, epoch, candidates)

    def epoch_end(self, global_step: int, epoch: int, candidates: Callable[[], dict]) -> None:
        if not self.evaluations or self.evaluations[-1]["step"] != global_step:
            self._validate(global_step, epoch, candidates)

    @torch.no_grad()
    def _score(self, modules: dict) -> dict:
        was = {k: m.training for k, m in modules.items()}
        for m in modules.values():
            m.eval()
        try:
            return self.evaluate(modules)
        finally:
            for k, m in modules.items():
                m.train(was[k])

    def _validate(self, step: int, epoch: int, candidates: Callable[[], dict]) -> None:
        cands = candidates()
        scores = {}
        for kind, modules in cands.items():
            metrics = self._score(modules)
            scores[kind] = metrics[METRIC[0]][METRIC[1]]
            self.evaluations.append({"step": step, "epoch": epoch, "weights": kind, "t2v_R@1": round(scores[kind], 3),
                                     "v2t_R@1": round(metrics["v2t"]["R@1"], 3)})
        kind = "ema" if scores.get("ema", float("-inf")) > scores["raw"] else "raw"
        if self.best is None or scores[kind] >= self.best["record"]["t2v_R@1"]:
            state = {name: {k: v.detach().to("cpu", copy=True) for k, v in m.state_dict().items()}
                     for name, m in cands[kind].items()}
            self.best = {"state": state, "record": {"step": step, "epoch": epoch, "weights": kind,
                                                    "t2v_R@1": round(scores[kind], 3)}}
        shown = ", ".join(f"{k} {v:.1f}" for k, v in scores.items())
        self.log(f"validation at step {step} (epoch {epoch}): t2v R@1 {shown}; best {self.best['record']['t2v_R@1']:.1f} "
                 f"({self.best['record']['weights']}, step {self.best['record']['step']})")

    def best_state(self) -> dict | None:
        """{name: state dict} of the best weights so far (None before the first validation)."""
        return None if self.best is None else self.best["state"]

    def summary(self) -> dict:
        """What generator.json / the manifest record: the split, the best and every evaluation."""
        return {"on": "val", "metric": "t2v R@1", "eval_every": self.eval_every, **self.record,
                "best": None if self.best is None else self.best["record"], "evaluations": list(self.evaluations)}

    def state_dict(self) -> dict:
        return {"best": self.best, "evaluations": self.evaluations}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.evaluations = state.get("best"), list(state.get("evaluations") or [])


# ------------------------------------------------------------------ stage one


class Stage1Validation:
    """t2v / v2t metrics of a stage-1 model on the validation captions and videos.

    tokens [Nt, L], caption_video [Nt] (row into `paths`), paths [Nv]. Videos are decoded once and
    kept (uint8) when they fit `keep_bytes`; else decoded at every validation."""

    def __init__(self, tokens, caption_video, paths, spec, cfg, device, keep_bytes: int = 1 << 30):
        from diffret.extract.data import KeptClips

        self.tokens, self.caption_video, self.paths = tokens, torch.as_tensor(caption_video).long(), list(paths)
        self.spec, self.cfg, self.device = spec, cfg, torch.device(device)
        self.keep, self.kept = KeptClips.nbytes(len(self.paths), spec) <= keep_bytes, None

    def _videos(self):
        """[(frames uint8 [B, F, 3, S, S], mask [B, F])] over the videos in order, B <= 64."""
        from diffret.extract.data import KeptClips, video_loader

        batch, n = max(1, min(self.cfg.batch_size, 64)), len(self.paths)
        if not self.keep:
            loader = video_loader(self.paths, self.spec, batch, self.cfg.workers, timeout=self.cfg.decode_timeout)
            return [(frames, mask) for frames, mask, _, _ in loader]
        if self.kept is None:  # decoded at the first validation, kept for the others
            self.kept = KeptClips(self.paths, self.spec, self.cfg.workers, self.cfg.decode_timeout)
        chunks = [list(range(s, min(s + batch, n))) for s in range(0, n, batch)]
        return [(frames, mask) for frames, mask, _, _ in self.kept.batches(chunks)]

    def __call__(self, modules: dict) -> dict:
        from diffret.extract.video import normalize

        model, dev, cfg = modules["model"], self.device, self.cfg
        half = any(p.dtype == torch.float16 for p in model.parameters())
        mean, std = torch.tensor(self.spec.mean, device=dev), torch.tensor(self.spec.std, device=dev)
        with torch.autocast(dev.type, dtype=torch.float16, enabled=dev.type == "cuda" and (cfg.amp or half)):
            texts = [model.encode_text(t.to(dev)) for t in self.tokens.split(256)]
            videos = [model.encode_video(normalize(f.to(dev), mean, std), m.to(dev)) for f, m in self._videos()]
        cat = lambda parts, k: torch.cat([p[k].float() if p[k].is_floating_point() else p[k] for p in parts])  # noqa: E731
        S = wti_similarity_chunked(cat(texts, "words"), cat(texts, "word_mask"), cat(texts, "word_logits"),
                                   cat(videos, "frames"), cat(videos, "frame_mask"), cat(videos, "frame_logits"),
                                   device=dev, padding=cfg.wti_padding)
        return retrieval_metrics(S, S.t(), self.caption_video)


def stage1_selector(tokens, caption_video, paths, spec, cfg, device, log=print) -> Selector:
    """extract/recipe.py Hooks.selector: the selector of `diffret extract --select-on val`."""
    return Selector(Stage1Validation(tokens, caption_video, paths, spec, cfg, device), cfg.eval_every, log)


# ------------------------------------------------------------------ stage two


def subset_videos(f, keep: torch.Tensor):
    """The SplitFeatures `f` restricted to the videos whose rows are True in `keep` [M] and their captions."""
    from diffret.generator.features import SplitFeatures

    keep = torch.as_tensor(keep, dtype=torch.bool)
    new_row = torch.cumsum(keep.long(), 0) - 1
    cap = keep[f.caption_video.cpu()]
    ci = torch.nonzero(cap).flatten()
    vi = torch.nonzero(keep).flatten()
    dev = f.sentence.device
    return SplitFeatures(
        caption_id=[f.caption_id[i] for i in ci.tolist()], caption_video=new_row[f.caption_video.cpu()[ci]].to(dev),
        sentence=f.sentence[ci.to(dev)], words=f.words[ci.to(f.words.device)], word_mask=f.word_mask[ci.to(dev)],
        word_logits=f.word_logits[ci.to(dev)], video_id=[f.video_id[i] for i in vi.tolist()],
        frames=f.frames[vi.to(dev)], frame_mask=f.frame_mask[vi.to(dev)], frame_logits=f.frame_logits[vi.to(dev)],
        wti_padding=f.wti_padding)


class Stage2Validation:
    """t2v / v2t metrics of the diffusion row (stage-1 scores re-ranked by the denoisers, as `diffret
    evaluate` computes it with its default options) on the validation features `f`."""

    def __init__(self, f, gen_cfg, device, sample_steps: int | None = None):
        from .evaluate import EvalData, EvalOptions

        self.f = f.to("cpu")
        S = wti_similarity_chunked(self.f.words, self.f.word_mask, self.f.word_logits, self.f.frames,
                                   self.f.frame_mask, self.f.frame_logits, device=device, padding=self.f.wti_padding)
        self.data = EvalData(None, self.f, S)
        self.opts = EvalOptions(device=str(device), **({"sample_steps": sample_steps} if sample_steps else {}))
        self.gen_cfg, self.device = gen_cfg, torch.device(device)

    def __call__(self, modules: dict) -> dict:
        from diffret.generator.generator import Generator

        from .evaluate import diffusion_row, eval_sampler

        gen = Generator(self.gen_cfg, modules["t2v"], modules["v2t"], {})
        s_t2v, s_v2t = diffusion_row(self.data, gen, eval_sampler(gen, self.opts), self.opts, self.device)
        return retrieval_metrics(s_t2v, s_v2t, self.f.caption_video)


class GeneratorSelection:
    """`train-generator --select-on val`: the validation features and the selector, and the training
    features without the held-out videos (`train_view`). The cache's `val` split when it has one,
    else a seeded cfg.val_fraction of its training videos (held out; recorded in generator.json)."""

    def __init__(self, cache_dir: Path, cfg, log=print):
        from diffret.cache.store import CacheReader
        from diffret.generator.features import load_split

        self.cfg, self.log = cfg, log
        reader = CacheReader(cache_dir)  # only its train and val splits are ever read here
        self.held: list[str] = []
        if "val" in reader.manifest.splits:
            val = load_split(reader, "val")
            self.record = {"val": {"source": "cache", "videos": len(val.video_id), "video_ids": list(val.video_id)}}
        else:
            train = load_split(reader, "train")
            self.held = held_out_videos(train.video_id, cfg.val_fraction, cfg.seed)
            if not self.held:
                raise ValueError(f"--select-on val: {cache_dir} has no val split and --val-fraction {cfg.val_fraction} "
                                 f"of its {len(train.video_id)} training videos holds out none")
            held = set(self.held)
            val = subset_videos(train, torch.tensor([v in held for v in train.video_id]))
            self.record = {"val": {"source": "held-out", "fraction": cfg.val_fraction, "seed": cfg.seed,
                                   "videos": len(self.held), "video_ids": list(self.held)}}
        self.validation = Stage2Validation(val, cfg, _device(cfg.device))
        self.selector = Selector(self.validation, cfg.eval_every, log, self.record)

    def train_view(self, f):
        """The training features `f` without the held-out validation videos (unchanged with a val split)."""
        if not self.held:
            return f
        held = set(self.held)
        return subset_videos(f, torch.tensor([v not in held for v in f.video_id]))


def _device(name: str) -> torch.device:
    from diffret.generator.device import resolve_device

    return resolve_device(name)
