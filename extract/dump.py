"""Dumping stage-1 features into the cache: every video, then every caption, split by split.

Per video: frame tokens after the temporal transformer [F, D], frame mask, frame-weight logits,
the sampled frames' decoded timestamps [F].
Per caption: EOT sentence feature [D], word tokens [L, D], word mask, word-weight logits.
A video that cannot be decoded is left out with its reason; its captions are left out too.

Resumable: the inputs of a split are cut into windows of `writer.shard_rows` items, window k
becomes shard k, and batches never straddle windows, so every window is encoded the same way
on every run. A re-run skips the windows whose shards the writer already holds (see
diffret.cache.writer) and gives the same tensors as an uninterrupted run.
`check_output` / `start_output` decide, before any work, whether `--out` is resumed, replaced
or refused.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch

from diffret.cache.journal import PROGRESS_DIR, RUN_FILE, Journal
from diffret.cache.layout import (
    CAPTIONS_FILE, WRITE_PROBE_PREFIX, foreign_files, has_cache_marker, is_empty_folder, refusal, remove_cache_files,
)
from diffret.cache.lock import LOCK_FILE
from diffret.cache.manifest import MANIFEST_NAME
from diffret.cache.writer import CacheWriter

from .data import threads_beside_workers, video_loader, window_batches
from .model import Stage1Model
from .video import FrameSpec, normalize


class OutputError(RuntimeError):
    """`--out` cannot be used as asked (one-line message)."""


def _np16(x: torch.Tensor):
    return x.float().cpu().numpy().astype("float16")


def _windows(n: int, size: int) -> int:
    return -(-n // size)


def _resume_point(writer: CacheWriter, kind: str, split: str, ids: list[str]) -> int:
    """The first window of `ids` to encode: after the finished shards that cover exactly the same
    inputs (the annotations may have changed since the interrupted run; then redo from there)."""
    size = writer.shard_rows
    for w in range(writer.completed(kind, split)):
        if sorted(writer.window_ids(kind, split, w)) != sorted(ids[w * size:(w + 1) * size]):
            writer.log(f"the {split} {'captions' if kind == 'text' else 'videos'} changed since the interrupted run: "
                       f"redoing them from shard {w}")
            writer.rewind(kind, split, w)
            return w
    return writer.completed(kind, split)


@torch.no_grad()
def dump_videos(
    model: Stage1Model, writer: CacheWriter, split: str, video_ids: list[str], paths: list, spec: FrameSpec,
    device: torch.device, batch_size: int, workers: int, amp: bool, progress=None, *, timeout: float | None,
) -> dict[str, str]:
    """Encode and write one split's videos (after the shards already finished); returns
    {video_id: reason} for every video of the split that failed, in this run or an earlier one."""
    n, size = len(paths), writer.shard_rows
    start = _resume_point(writer, "video", split, video_ids)
    batches = window_batches(n, size, batch_size, start)
    task = progress.add_task(f"encode {split} videos", total=n, completed=min(n, start * size)) if progress else None
    mean, std = torch.tensor(spec.mean, device=device), torch.tensor(spec.std, device=device)
    window = start
    with threads_beside_workers(workers if batches else 0, device):
        for frames, mask, times, idx, reasons in video_loader(paths, spec, batch_size, workers, timeout=timeout,
                                                              batches=batches, times=True) if batches else []:
            ok = mask.any(dim=1)
            bad = torch.nonzero(~ok).flatten().tolist()
            writer.add_failures([(video_ids[idx[i]], str(paths[idx[i]]), reasons[i]) for i in bad], split=split)
            if ok.any():
                frames = normalize(frames[ok].to(device, non_blocking=True), mean, std)
                with torch.autocast(device.type, enabled=amp and device.type == "cuda"):
                    out = model.encode_video(frames, mask[ok].to(device))
                keep = idx[ok].tolist()
                writer.add_video(
                    split, [video_ids[i] for i in keep], [str(paths[i]) for i in keep],
                    _np16(out["frames"]), out["frame_mask"].cpu().numpy(), _np16(out["frame_logits"]),
                    frame_times=times[ok].numpy(),
                )
            if int(idx[-1]) + 1 == min((window + 1) * size, n):  # last batch of the window: its shard is done
                writer.end_shard("video", split)
                window += 1
            if progress:
                progress.update(task, advance=len(idx))
    if progress:
        progress.remove_task(task)
    ids = set(video_ids)
    return {v: reason for v, (_, reason) in writer.failures.items() if v in ids}


@torch.no_grad()
def dump_texts(
    model: Stage1Model, writer: CacheWriter, split: str, caption_ids: list[str], video_ids: list[str],
    captions: list[str], tokens: torch.Tensor, device: torch.device, batch_size: int, amp: bool, progress=None,
) -> None:
    """Encode and write one split's captions (tokens [N, L]) after the shards already finished."""
    n, size = len(captions), writer.shard_rows
    start = _resume_point(writer, "text", split, caption_ids)
    task = progress.add_task(f"encode {split} captions", total=n, completed=min(n, start * size)) if progress else None
    for lo, hi in ((w * size, min((w + 1) * size, n)) for w in range(start, _windows(n, size))):
        for s in range(lo, hi, batch_size):
            sl = slice(s, min(s + batch_size, hi))
            with torch.autocast(device.type, enabled=amp and device.type == "cuda"):
                out = model.encode_text(tokens[sl].to(device))
            writer.add_text(
                split, caption_ids[sl], video_ids[sl], captions[sl], _np16(out["sentence"]), _np16(out["words"]),
                out["word_mask"].cpu().numpy(), _np16(out["word_logits"]),
            )
            if progress:
                progress.update(task, advance=sl.stop - sl.start)
        writer.end_shard("text", split)
    if progress:
        progress.remove_task(task)


# --------------------------------------------------------------------------- the output folder


COMPLETE = "complete"  # check_output: `out` already holds this very cache (same settings, same inputs)


def check_output(out: Path, overwrite: bool, mismatch=None, inputs=None, complete_changed=None):
    """Decide, writing nothing, what to do with `out`: True when an unfinished run is resumed,
    False when it is (re)started, COMPLETE when it already holds this cache (nothing to do).

    A complete cache (manifest present) with the same settings (`mismatch(config)` None) and inputs
    (`complete_changed(out)` None) is COMPLETE: re-running a finished command is a no-op; with other
    settings or inputs it is refused without `overwrite`. The remains of an interrupted run,
    recognised by a file only diffret writes (the journal's run record, a stage-1 checkpoint; never
    by a folder's name), are resumed; other settings (`mismatch`, a phrase or None) or other inputs
    (`inputs()`, see `input_fingerprint`, against the journal's record) refuse the resume. The remains of
    a run that did no work (only its run record: it failed before fine-tuning or writing a shard)
    never block: the run starts over. A folder that holds anything diffret did not write
    (cache/layout.py `foreign_files`) is refused, with or without `overwrite`, naming it:
    `--overwrite` removes only diffret's own files.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out} is a file, not a folder")
    if not out.is_dir() or is_empty_folder(out):
        return False
    if (out / MANIFEST_NAME).exists() and not overwrite:
        try:
            saved = json.loads((out / MANIFEST_NAME).read_text(encoding="utf-8")).get("extract_config") or {}
        except (OSError, ValueError, AttributeError):
            saved = None
        why = (mismatch(saved) if mismatch else None) if saved is not None else "an unreadable manifest"
        if why:
            raise OutputError(f"{out} already holds a complete cache made with other settings ({why}); "
                              f"pass --overwrite to rebuild it")
        why = complete_changed(out) if complete_changed else None
        if why:
            raise OutputError(f"{out} already holds a complete cache of other inputs ({why}); "
                              f"pass --overwrite to rebuild it")
        return COMPLETE
    why = refusal(out, foreign_files(out), has_cache_marker(out), overwrite, "cache")
    if why:
        raise OutputError(why)
    if overwrite or did_no_work(out):
        return False
    run = Journal(out).read_run()
    why = mismatch(run.get("config", {})) if (run and mismatch) else None
    if why:
        raise OutputError(f"{out} holds an unfinished extraction with other settings ({why}); re-run it with "
                          f"the same settings to resume, or pass --overwrite to start over")
    why = inputs_changed(run.get("inputs"), inputs()) if (run and run.get("inputs") and inputs) else None
    if why:
        raise OutputError(f"{out} holds an unfinished extraction of other inputs ({why} since); restore it to "
                          f"resume, or pass --overwrite to start over")
    return True


def did_no_work(out: Path) -> bool:
    """True when `out` holds nothing but a run record (progress/run.json) and a lock: the remains of a
    run that failed before it fine-tuned or wrote anything (a bad --model, an unreadable input)."""
    out = Path(out)
    if not (out / PROGRESS_DIR / RUN_FILE).is_file():
        return False
    for p in out.rglob("*"):
        rel = p.relative_to(out).as_posix()
        if p.is_dir() and rel == PROGRESS_DIR:
            continue
        if rel not in (f"{PROGRESS_DIR}/{RUN_FILE}", LOCK_FILE) and not p.name.startswith(WRITE_PROBE_PREFIX):
            return False
    return True


def start_output(out: Path, config: dict, resume: bool, log=print, inputs: dict | None = None) -> None:
    """Make `out` ready: clear it unless resuming, check that it is writable, record the run's
    settings and the fingerprint of its inputs (`input_fingerprint`)."""
    out = Path(out)
    if out.is_dir() and not is_empty_folder(out) and not resume:  # check_output vetted the folder
        log(f"starting over: the earlier run in {out} did no work" if did_no_work(out)
            else f"--overwrite: removing the cache files in {out}")
        remove_cache_files(out)
    elif resume:
        log(f"resuming the unfinished extraction in {out}")
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=WRITE_PROBE_PREFIX, dir=out)
        os.close(fd)
        os.unlink(probe)
        journal = Journal(out)
        if not (resume and journal.read_run()):
            journal.write_run({"config": config, **({"inputs": inputs} if inputs else {})})
    except OSError as e:
        raise OutputError(f"cannot write to {out}: {e.strerror or e}") from None


# --------------------------------------------------------------------------- the inputs

ANNOTATION_SUFFIXES = (".json", ".jsonl", ".ndjson", ".csv", ".tsv", ".txt", ".pkl", ".pickle")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def input_fingerprint(data_root: Path, video_paths) -> dict:
    """What a resume must find unchanged: the sha256 of every annotation file (the files of these
    suffixes at the top of `data_root`, or `data_root` itself when it is a file) and the size and
    mtime of every video (None: missing). Stat only: no video is read."""
    root = Path(data_root)
    files = [root] if root.is_file() else sorted(p for p in root.iterdir()
                                                if p.is_file() and p.suffix.lower() in ANNOTATION_SUFFIXES)
    videos = {}
    for path in video_paths:
        try:
            st = os.stat(path)
            videos[str(path)] = [st.st_size, st.st_mtime_ns]
        except OSError:
            videos[str(path)] = None
    return {"annotations": {str(p): _sha256(p) for p in files}, "videos": videos}


def inputs_changed(saved: dict | None, now: dict) -> str | None:
    """The first input that differs between two `input_fingerprint`s, as a phrase; None if none
    (or no record: a journal written before inputs were recorded)."""
    if not isinstance(saved, dict):
        return None
    for key, what in (("annotations", "annotation file"), ("videos", "video")):
        a, b = saved.get(key) or {}, now.get(key) or {}
        for name in list(b) + [n for n in a if n not in b]:
            if name not in a:
                return f"the {what} {name} was added"
            if name not in b:
                return f"the {what} {name} was removed"
            if a[name] != b[name]:
                return f"the {what} {name} " + ("is gone" if b[name] is None else "changed")
    return None


def cached_inputs_changed(out: Path, ann) -> str | None:
    """For a complete cache: the first caption of the annotations `ann` that differs from the cache's
    captions.parquet (edited, added or removed; captions of videos left out as failures aside), or None."""
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(Path(out) / CAPTIONS_FILE, columns=["caption_id", "video_id", "caption"]).to_pylist()
    except (OSError, ValueError) as e:
        return f"unreadable {CAPTIONS_FILE}: {e}"
    cached = {r["caption_id"]: r["caption"] for r in rows}
    in_cache = {r["video_id"] for r in rows}
    now = {c.caption_id: c.text for c in ann.captions if c.video_id in in_cache and c.split in ("train", "val", "test")}
    for cid, text in now.items():
        if cached.get(cid) != text:
            return f"caption {cid} " + ("was added" if cid not in cached else "changed") + " in the annotations"
    for cid in cached:
        if cid not in now:
            return f"caption {cid} was removed from the annotations"
    return None


def check_split_videos(ann, splits, fingerprint: dict | None = None) -> None:
    """Before any work: every split in `splits` that has captions needs a video that exists and opens.
    All are checked for existence (a stat each, from `fingerprint` when given); only until the first
    that opens per split are they opened (opening every video would be slow on a large set; the
    others that do not decode are left out during the dump and listed in failures.parquet)."""
    from .video import first_line

    videos = (fingerprint or {}).get("videos") or {}
    for split in splits:
        ids = ann.video_ids(split)
        if not ids:
            continue
        paths = [Path(ann.videos[v]) for v in ids]
        there = [p for p in paths if (videos[str(p)] is not None if str(p) in videos else p.is_file())]
        if not there:
            raise OutputError(f"none of the {len(paths)} {split} videos exists (e.g. {paths[0]}); check "
                              f"--data-root and --video-dir")
        reason = None
        for p in there:
            try:
                import decord

                vr = decord.VideoReader(str(p), num_threads=1)
                n = len(vr)
                del vr
                if n > 0:
                    break
                reason = reason or f"{p}: no frames"
            except Exception as e:  # noqa: BLE001 (decord raises plain RuntimeError/DECORDError)
                reason = reason or f"{p}: {first_line(e)}"
        else:
            raise OutputError(f"none of the {len(there)} {split} videos found opens as a video ({reason})")
