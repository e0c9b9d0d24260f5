"""`diffret extract` end to end: annotations -> stage-1 model -> fine-tune -> checkpoint -> cache."""
from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import torch

from diffret.cache.manifest import MANIFEST_NAME, Manifest, held_out_videos
from diffret.cache.layout import FAILURES_FILE, read_failures, write_failures
from diffret.cache.lock import OutputLock
from diffret.cache.writer import CacheWriter

from .annotations import load_annotations
from .backbone import activation_of, get_tokenizer
from .checkpoint import read_stage1, resolve_stage1_config
from .config import ExtractConfig, recipe_mismatch
from .data import threads_beside_workers
from .dump import (
    COMPLETE, cached_inputs_changed, check_output, check_split_videos, dump_texts, dump_videos, input_fingerprint,
    start_output,
)
from .distributed import DistInfo, all_gather_objects, barrier, init_distributed, on_main, rank_slice
from .finetune import stage1_model
from .merge import merge_parts, part_dir, prepare_parts
from .recipe import Hooks


class ExtractError(RuntimeError):
    """Extraction cannot start (one-line message)."""


def resolve_device(name: str, info: DistInfo = DistInfo()) -> torch.device:
    """auto: a GPU if there is one; under torchrun the process's own GPU (LOCAL_RANK)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ExtractError("--device cuda was asked for but no CUDA GPU is visible")
    if name == "cuda" and info.enabled:
        return torch.device("cuda", info.local_rank)
    return torch.device(name)


def with_validation(ann, cfg: ExtractConfig):
    """-> (annotations, the validation record for the manifest). With select_on "val": the dataset's
    own val split where it has one, else a seeded cfg.val_fraction of the training videos, whose
    captions move to split "val" (held out from training, dumped as the cache's val split)."""
    if cfg.select_on != "val" or cfg.epochs <= 0:
        return ann, {"on": "last"}
    if ann.split("val"):
        ids = ann.video_ids("val")
        return ann, {"on": "val", "val": {"source": "dataset", "videos": len(ids), "video_ids": ids}}
    ids = held_out_videos(ann.video_ids("train"), cfg.val_fraction, cfg.seed)
    if not ids:
        raise ExtractError(f"--select-on val: {cfg.dataset} has no validation split and --val-fraction "
                           f"{cfg.val_fraction} of {len(ann.video_ids('train'))} training videos holds out none")
    held = set(ids)
    caps = [replace(c, split="val") if c.split == "train" and c.video_id in held else c for c in ann.captions]
    return replace(ann, captions=caps), {"on": "val", "val": {
        "source": "held-out", "fraction": cfg.val_fraction, "seed": cfg.seed, "videos": len(ids), "video_ids": ids}}


def run_stage1(cfg: ExtractConfig, out: Path, overwrite: bool = False, progress=None, log=print,
               resume_training: bool = False, hooks: Hooks | None = None) -> dict:
    """Fine-tune (cfg.epochs, 0 = zero-shot) and dump the cache into `out`; returns a summary.

    Under torchrun every process calls this; rank 0 prepares `out` and merges the parts.
    `resume_training` continues an unfinished fine-tuning from its last epoch (--resume).
    `hooks`: what pipeline/ hands in (recipe.Hooks: the original recipe's BertAdam, the validator).
    """
    out = Path(out)
    if cfg.stage1 and Path(cfg.stage1).resolve().is_relative_to(out.resolve()):
        raise ExtractError(f"--stage1 {cfg.stage1} lies inside --out {out}, which this run rewrites; copy it elsewhere")
    cfg = resolve_stage1_config(cfg)  # --stage1: the model comes from that checkpoint
    info = init_distributed(resolve_device(cfg.device).type)
    device = resolve_device(cfg.device, info)
    held: list[OutputLock] = []  # one writer per folder: rank 0 locks `out` for the whole job (cache/lock.py)
    on_main(lambda: held.append(OutputLock(out, log=log).acquire()), info)
    try:
        return _extract(cfg, out, overwrite, progress, log, resume_training, info, device, hooks)
    finally:
        for lock in held:
            lock.release()


def _extract(cfg: ExtractConfig, out: Path, overwrite: bool, progress, log, resume_training: bool, info: DistInfo,
             device: torch.device, hooks: Hooks | None = None) -> dict:
    """run_stage1 once `out` is locked: check it, fine-tune, dump, merge the parts."""
    loaded: dict = {}  # the annotations and the fingerprint of the inputs, read once when first needed

    def annotations():
        if "ann" not in loaded:  # with select_on "val", held-out training videos are split "val"
            loaded["ann"], loaded["selection"] = with_validation(
                load_annotations(cfg.dataset, cfg.data_root, video_dir=cfg.video_dir), cfg)
        return loaded["ann"]

    def inputs() -> dict:  # reads the annotation files, stats the videos (see dump.input_fingerprint)
        if "inputs" not in loaded:
            loaded["inputs"] = input_fingerprint(cfg.data_root, annotations().videos.values())
        return loaded["inputs"]

    resume = on_main(lambda: check_output(out, overwrite, mismatch=lambda saved: recipe_mismatch(saved, cfg),
                                          inputs=inputs, complete_changed=lambda o: cached_inputs_changed(
                                              o, annotations())), info)
    if resume == COMPLETE and cfg.dataset == "folder":  # a folder collection: extract the videos added since
        from .grow import grow_folder

        grown = on_main(lambda: grow_folder(cfg, out, annotations(), device, progress, log), info)
        if grown is not None:
            return grown
    if resume == COMPLETE:  # the same command on its finished cache: a no-op, so that re-running it is safe
        log(f"{out} is already complete (same settings, same captions): nothing to do")
        splits = json.loads((out / MANIFEST_NAME).read_text(encoding="utf-8")).get("splits") or {}
        return {"cache": str(out), "complete": True, "splits": splits, "failed": len(read_failures(out)),
                "failures_file": str(out / FAILURES_FILE), "seconds": 0.0, "device": str(device)}
    ann = annotations()
    if not ann.split("train") and cfg.epochs > 0:
        raise ExtractError(f"{cfg.data_root} has no training captions to fine-tune on (use --epochs 0)")
    splits = ("train", "val", "test") if cfg.select_on == "val" and cfg.epochs > 0 else ("train", "test")
    splits = getattr(ann, "dump_splits", None) or splits  # a folder collection: its `gallery` (no captions)
    on_main(lambda: check_split_videos(ann, splits, inputs()), info)  # before fine-tuning
    on_main(lambda: start_output(out, cfg.to_dict(), resume, log, inputs=inputs()), info)  # nothing written before
    tokenizer = get_tokenizer(cfg.model)
    t0 = time.time()

    failures: dict[str, str] = {}  # path -> reason
    model, spec, fp, ckpt = stage1_model(cfg, out, ann, tokenizer, device, info, resume_training, progress, failures, log,
                                         hooks)
    selection = dict(loaded["selection"])
    if selection["on"] == "val":
        selection["best"] = (read_stage1(ckpt).get("selection") or {}).get("best")

    manifest = Manifest(
        width=model.width, n_words=cfg.words, n_frames=cfg.frames, dataset=cfg.dataset,
        model={"name": cfg.model, "pretrained": str(cfg.pretrained), "fingerprint": fp,
               "activation": activation_of(model)},
        extract_config=cfg.to_dict(), logit_scale=float(model.logit_scale.item()),
        wti_padding=cfg.wti_padding,  # the rule stage 1 trained with: score the cache by it
        selection=selection,  # which weights were kept; the validation videos (the cache's val split)
    )
    # Under torchrun each process writes a contiguous slice of every split to its own part.
    on_main(lambda: prepare_parts(out, info.world, resume), info)
    root = part_dir(out, info.rank) if info.enabled else out
    writer = CacheWriter(root, manifest, shard_rows=cfg.shard_rows, resume=resume, log=log)
    failed_videos: dict[str, str] = {}
    counts = {}
    for split in splits:
        caps, vids = ann.split(split), ann.video_ids(split)
        if not vids:
            continue
        mine = vids[rank_slice(len(vids), info)]
        # While videos decode, the model gets the cores the decoding workers leave (a setting that
        # depends on the machine and --workers only: every run of a dump computes the same tensors).
        with threads_beside_workers(cfg.workers, device):
            done = dump_videos(
                model, writer, split, mine, [ann.videos[v] for v in mine], spec, device,
                batch_size=max(1, min(cfg.batch_size, 64)), workers=cfg.workers, amp=cfg.amp, progress=progress,
                timeout=cfg.decode_timeout,
            )
        for part in all_gather_objects(done, info):
            failed_videos.update(part)
        if vids and all(v in failed_videos for v in vids):  # nothing of this split to cache: stop, say where to look
            rows = sorted((v, str(ann.videos.get(v, "")), failed_videos[v]) for v in vids)
            on_main(lambda: write_failures(out, rows), info)
            raise ExtractError(f"none of the {len(vids)} {split} videos could be decoded; the reasons are in "
                               f"{out / FAILURES_FILE}")
        caps = [c for c in caps if c.video_id not in failed_videos]
        my_caps = caps[rank_slice(len(caps), info)]
        tokens = tokenizer([c.text for c in my_caps], context_length=cfg.words)
        dump_texts(
            model, writer, split, [c.caption_id for c in my_caps], [c.video_id for c in my_caps],
            [c.text for c in my_caps], tokens, device, batch_size=256, amp=cfg.amp, progress=progress,
        )
        counts[split] = {"captions": len(caps), "videos": len(vids) - sum(v in failed_videos for v in vids)}
    path_of = {str(p): v for v, p in ann.videos.items()}
    writer.add_failures([(path_of.get(path, path), path, reason) for path, reason in failures.items()])
    if cfg.dataset == "folder":  # what a re-run compares the folder with (extract/grow.py)
        from .grow import write_folder_inputs

        write_folder_inputs(root, ann.videos)
    writer.close()  # failures.parquet lists the videos that are not in the cache, with their reasons
    if info.enabled:
        barrier(info)
        on_main(lambda: merge_parts(out, info.world), info)
    return {
        "cache": str(out), "checkpoint": str(ckpt), "fingerprint": fp, "splits": counts,
        "failed": len(read_failures(out)), "failures_file": str(out / FAILURES_FILE),
        "seconds": round(time.time() - t0, 1), "device": str(device),
    }
