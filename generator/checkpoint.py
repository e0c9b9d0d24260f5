"""Generator run folders: `generator.pt` (both denoisers' weights), `generator.json` (config,
width, parameter counts, the cache it was trained on, and `weights_sha256`: the sha256 of
generator.pt, checked on every load), `train_state.pt` (what `--resume` continues from) and
`commit.json`, the record that makes one epoch's files a single atomic commit.

A commit (`save_checkpoint`, after every epoch) writes each file to a pending name
(`.generator.pt.pending`, ...; each atomically), then `commit.json` (the epoch and every file's
sha256: the commit point), then renames the pending files onto their names. A kill at any instant
leaves either the previous commit intact (its files untouched, `commit.json` still naming it) or the
new one recorded, each of its files under its name or still pending. Readers take every file of the
recorded commit from its name or, when its rename had not happened yet, from its pending copy
(never a mix of two epochs); the folder's writer (`train-generator`, also on `--resume`) first
finishes an interrupted commit's renames (`finish_commit`). Folders written before commit records
are read as they are."""
from __future__ import annotations

import copy
import hashlib
import io
import json
import os
from pathlib import Path

import torch
from torch import nn

from diffret.cache.atomic import atomic_open, atomic_write_text

from .config import GeneratorConfig
from .denoiser import T2VDenoiser, V2TDenoiser
from .generator import Generator

WEIGHTS_NAME = "generator.pt"
META_NAME = "generator.json"
STATE_NAME = "train_state.pt"
COMMIT_NAME = "commit.json"
WEIGHTS_SHA_KEY = "weights_sha256"  # generator.json: sha256 of generator.pt as written
COMMITTED_NAMES = (WEIGHTS_NAME, META_NAME, STATE_NAME)  # the files a commit may hold


class GeneratorError(RuntimeError):
    """A generator folder that is missing or unreadable (one-line message)."""


def pending_name(name: str) -> str:
    """The name a commit's file is written under before its rename (`.generator.pt.pending`)."""
    return f".{name}.pending"


def _boundary(label: str) -> None:
    """Called after each step of a commit (tests stop the process here, as a kill would)."""


def _sha(data) -> str:
    return hashlib.sha256(data).hexdigest()


def _fsync_dir(folder: Path) -> None:
    """Make the renames in `folder` durable (best effort: not every platform opens folders)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _read_commit(folder: Path) -> dict | None:
    """commit.json of `folder`; None when absent (a folder written before commit records)."""
    path = Path(folder) / COMMIT_NAME
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError as e:
        raise GeneratorError(f"cannot read {path}: {e.strerror or e}") from None
    try:
        rec = json.loads(text)
    except ValueError as e:
        raise GeneratorError(f"cannot read {path}: {str(e).splitlines()[0][:160]}") from None
    files = rec.get("files") if isinstance(rec, dict) else None
    if not (isinstance(files, dict) and all(isinstance(v, str) for v in files.values())):
        raise GeneratorError(f"cannot read {path}: not a diffret commit record (no files and their sha256)")
    return rec


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise GeneratorError(f"cannot read {path}: {e.strerror or e}") from None


def _committed(folder: Path, rec: dict, name: str) -> bytes | None:
    """The bytes of `name` as `rec` committed them: the file itself, or its pending copy when the
    commit's renames were interrupted (looked at again after it: the writer may rename meanwhile)."""
    want = rec["files"][name]
    for path in (folder / name, folder / pending_name(name), folder / name):
        data = _read(path)
        if data is not None and _sha(data) == want:
            return data
    return None


def read_committed(folder: Path, names=(WEIGHTS_NAME, META_NAME), strict: tuple = ()) -> tuple[dict, dict | None]:
    """-> ({name: bytes} of the files of `names` in `folder`'s last complete commit, its record).

    Read-only. A file whose bytes match neither its committed sha256 nor a pending copy was changed
    after its commit: it is returned as it is (the load's own checks judge it) unless it is in
    `strict` (then GeneratorError). Without commit.json (an older diffret's folder): the files as
    they are, and None. A file the commit does not hold is left out."""
    folder = Path(folder)
    for _ in range(3):  # a writer committing meanwhile changes the record: read the new one
        rec = _read_commit(folder)
        if rec is None:
            return {n: d for n in names if (d := _read(folder / n)) is not None}, None
        files, changed = {}, None
        for name in names:
            if name not in rec["files"]:
                continue
            data = _committed(folder, rec, name)
            if data is None:
                changed = changed or name
                data = _read(folder / name)
            if data is not None:
                files[name] = data
        if (changed is None or changed not in strict) and _epochs_agree(files, rec):
            return files, rec
        if _read_commit(folder) == rec:
            break
    if changed is not None and changed in strict:
        raise GeneratorError(
            f"{folder / changed} is not the file {COMMIT_NAME} records for epoch {rec.get('epochs_done')} (its "
            f"sha256 differs): the folder was changed after training wrote it; retrain (without --resume)")
    raise GeneratorError(
        f"{folder} mixes files of two epochs ({COMMIT_NAME} records epoch {rec.get('epochs_done')}): it was changed "
        f"after training wrote it; retrain, or restore all its files together")


def _epochs_agree(files: dict, rec: dict) -> bool:
    """generator.json's `epochs_done` is the commit's (generator.pt's meta is checked on load)."""
    if META_NAME not in files:
        return True
    try:
        meta = json.loads(files[META_NAME])
    except ValueError:
        return True  # unreadable: load_generator says so
    return not isinstance(meta, dict) or meta.get("epochs_done") == rec.get("epochs_done")


def finish_commit(out: Path) -> None:
    """Complete `out`'s interrupted commit, if any: rename the pending files its record names onto
    their names, and remove pending files of a commit that was never recorded. For the folder's
    one writer (train-generator), before it writes and when it resumes."""
    out = Path(out)
    rec = _read_commit(out)
    for name in COMMITTED_NAMES:
        pending = out / pending_name(name)
        if not pending.is_file():
            continue
        want = rec["files"].get(name) if rec is not None else None
        final = _read(out / name)
        if want is not None and (final is None or _sha(final) != want) and _sha(pending.read_bytes()) == want:
            os.replace(pending, out / name)
        else:  # already renamed, or a write that never reached its commit record
            pending.unlink()
    _fsync_dir(out)


def commit_files(out: Path, files: dict[str, bytes], epochs_done) -> None:
    """Write `files` ({name: bytes}) into `out` as one atomic commit of epoch `epochs_done`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    finish_commit(out)
    for name, data in files.items():
        with atomic_open(out / pending_name(name)) as fh:
            fh.write(data)
        _boundary(f"pending {name}")
    record = {"epochs_done": epochs_done, "files": {name: _sha(data) for name, data in files.items()}}
    atomic_write_text(out / COMMIT_NAME, json.dumps(record, indent=2) + "\n")
    _fsync_dir(out)
    _boundary(f"wrote {COMMIT_NAME}")
    for name in files:
        os.replace(out / pending_name(name), out / name)
        _boundary(f"renamed {name}")
    _fsync_dir(out)


def _generator_files(t2v: nn.Module, v2t: nn.Module, meta: dict) -> dict[str, bytes]:
    buf = io.BytesIO()
    torch.save({"t2v": t2v.state_dict(), "v2t": v2t.state_dict(), "meta": meta}, buf)
    data = buf.getvalue()
    # The checksum of the bytes written (not re-read from disk), recorded beside them.
    text = json.dumps({**meta, WEIGHTS_SHA_KEY: _sha(data)}, indent=2) + "\n"
    return {WEIGHTS_NAME: data, META_NAME: text.encode("utf-8")}


def best_modules(modules: list[nn.Module], best: dict | None) -> list[nn.Module]:
    """[t2v, v2t] holding the weights of `best` ({"t2v": state dict, "v2t": ...}, the validation
    selector's best: pipeline/selection.py), as copies; `modules` themselves when best is None."""
    if best is None:
        return list(modules)
    out = []
    for name, m in zip(("t2v", "v2t"), modules):
        m = copy.deepcopy(m)
        m.load_state_dict(best[name])
        out.append(m)
    return out


def save_generator(out: Path, t2v: nn.Module, v2t: nn.Module, meta: dict) -> None:
    """generator.pt and generator.json (no train state: not resumable), one commit."""
    commit_files(out, _generator_files(t2v, v2t, meta), meta.get("epochs_done"))


def save_checkpoint(out: Path, t2v: nn.Module, v2t: nn.Module, meta: dict, state: dict) -> None:
    """An epoch's generator.pt, generator.json and train_state.pt (everything `train-generator
    --resume` needs: raw and EMA weights, optimizer, RNG, history), one commit."""
    buf = io.BytesIO()
    torch.save(state, buf)
    commit_files(out, {**_generator_files(t2v, v2t, meta), STATE_NAME: buf.getvalue()}, meta.get("epochs_done"))


def _recorded_sha256(path: Path, text: bytes | None) -> str | None:
    """generator.json's `weights_sha256`; None when the file or the field is absent (a generator
    written before checksums were recorded: nothing to compare, so it is accepted)."""
    if text is None:
        return None
    try:
        meta = json.loads(text)
    except ValueError as e:
        raise GeneratorError(f"cannot read {path}: {str(e).splitlines()[0][:160]}") from None
    if not isinstance(meta, dict):
        raise GeneratorError(f"cannot read {path}: expected a JSON object, got {type(meta).__name__}")
    return meta.get(WEIGHTS_SHA_KEY)


def read_meta(folder: Path) -> dict:
    """generator.json of `folder`'s last complete commit."""
    path = Path(folder) / META_NAME
    files, _ = read_committed(folder, (META_NAME,))
    if META_NAME not in files:
        raise GeneratorError(f"{folder} holds no trained generator ({META_NAME} is missing)")
    try:
        return json.loads(files[META_NAME])
    except ValueError as e:
        raise GeneratorError(f"cannot read {path}: {str(e).splitlines()[0][:160]}") from None


def load_generator(folder: Path, device="cpu") -> Generator:
    """-> the Generator of `folder`'s last complete commit, both denoisers in eval mode on `device`."""
    folder = Path(folder)
    path = folder / WEIGHTS_NAME
    files, rec = read_committed(folder, (WEIGHTS_NAME, META_NAME))
    if WEIGHTS_NAME not in files:
        raise GeneratorError(f"{folder} holds no trained generator ({WEIGHTS_NAME} is missing)")
    data = files[WEIGHTS_NAME]  # small: read once, check, then load from memory
    recorded = _recorded_sha256(folder / META_NAME, files.get(META_NAME))
    if recorded is not None and _sha(data) != recorded:
        raise GeneratorError(
            f"{path} does not match {META_NAME}: its sha256 differs from the one recorded when it was written "
            f"(a damaged file, or the two files come from different writes); retrain or restore both")
    try:
        state = torch.load(io.BytesIO(data), map_location=device, weights_only=False)
        meta = state["meta"]
    except Exception as e:  # truncated, foreign or corrupted file
        raise GeneratorError(f"cannot read {path}: {str(e).splitlines()[0][:160]}") from None
    if rec is not None and meta.get("epochs_done") != rec.get("epochs_done"):
        raise GeneratorError(f"{path} is of epoch {meta.get('epochs_done')}, {COMMIT_NAME} records epoch "
                             f"{rec.get('epochs_done')}: the folder mixes two writes; retrain or restore it")
    cfg = GeneratorConfig.from_dict(meta["config"])
    t2v, v2t = T2VDenoiser(meta["width"], cfg.temp), V2TDenoiser(meta["width"], cfg.temp)
    t2v.load_state_dict(state["t2v"])
    v2t.load_state_dict(state["v2t"])
    return Generator(cfg, t2v.to(device).eval(), v2t.to(device).eval(), meta)


def load_train_state(folder: Path) -> dict:
    """train_state.pt of `folder`'s last complete commit (exactly as committed: resume continues from
    it). An older diffret's folder (no commit.json) is refused when its train_state.pt and
    generator.json come from different epochs (an interrupted write)."""
    folder = Path(folder)
    path = folder / STATE_NAME
    files, rec = read_committed(folder, (STATE_NAME, META_NAME), strict=(STATE_NAME,))
    if STATE_NAME not in files:
        held = f" ({COMMIT_NAME} holds no train state: a generator that cannot be resumed)" if rec else ""
        raise GeneratorError(f"nothing to resume in {folder}: {STATE_NAME} is missing{held} (run without --resume)")
    try:
        state = torch.load(io.BytesIO(files[STATE_NAME]), map_location="cpu", weights_only=False)
    except Exception as e:  # a truncated or foreign file
        raise GeneratorError(f"cannot read {path}: {str(e).splitlines()[0][:160]}") from None
    if rec is None and META_NAME in files:
        try:
            done = json.loads(files[META_NAME]).get("epochs_done")
        except (ValueError, AttributeError):
            done = None
        if done is not None and isinstance(state, dict) and state.get("epochs_done") != done:
            raise GeneratorError(
                f"{folder} was interrupted while writing an epoch: {STATE_NAME} is of epoch "
                f"{state.get('epochs_done')}, {META_NAME} of epoch {done} (written by a diffret without commit "
                f"records); retrain without --resume")
    return state
