"""The cache manifest: what a cache holds and what made it.

`manifest.json` is the cache's table of contents and its proof of origin. Consumers read it
first and refuse a cache whose schema version, width or stage-1 fingerprint does not fit.
It is replaced atomically (atomic.py), so a reader never sees half of one.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .atomic import atomic_write_text
from .layout import CAPTIONS_FILE, FAILURES_FILE, FOLDER_INPUTS_FILE, VIDEOS_FILE

SCHEMA_VERSION = 2  # 2: model.activation, wti_padding (the fidelity round), files (every file's sha256)
MANIFEST_NAME = "manifest.json"
STAGE1_FILE = "stage1.pt"  # the stage-1 checkpoint a cache's features came from (extract/checkpoint.py writes it)
# The files of a cache (besides the manifest and the shards, which have their own records) whose
# sha256 the manifest records in `files` when present: every file diffret writes there and later trusts.
CHECKSUMMED_FILES = (CAPTIONS_FILE, VIDEOS_FILE, FAILURES_FILE, STAGE1_FILE, FOLDER_INPUTS_FILE)


class CacheError(RuntimeError):
    """A cache that is missing, incomplete, corrupted or incompatible (one-line message)."""


@dataclass
class ShardRecord:
    """One HDF5 shard: its file (relative to the cache root), kind, split, rows and checksum."""

    file: str
    kind: str  # "text" | "video"
    split: str
    rows: int
    sha256: str


@dataclass
class Manifest:
    """Everything a consumer needs to trust and interpret a cache."""

    width: int  # joint feature width D
    n_words: int  # word slots L per caption (padded)
    n_frames: int  # frame slots F per video (padded)
    model: dict  # {"name", "pretrained", "fingerprint", "activation"}
    extract_config: dict
    dataset: str = ""
    dtype: str = "float16"
    schema_version: int = SCHEMA_VERSION
    splits: dict = field(default_factory=dict)  # split -> {"captions": n, "videos": n}
    shards: list[ShardRecord] = field(default_factory=list)
    logit_scale: float = 100.0  # stage-1 logit scale, for the revisers that use scaled scores
    # How WTI treats a padded (word, frame) pair inside its maxima: "zero" (the original: masked
    # cosines count as 0) or "exclude" (they never win a max). Every scorer of this cache uses it.
    wti_padding: str = "zero"
    # sha256 of every other file of the cache that diffret wrote and trusts (CHECKSUMMED_FILES that
    # exist), by path relative to the cache root: {"captions.parquet": hex, ...}. Set by file_checksums.
    files: dict = field(default_factory=dict)
    # The first-stage search index in index/ (cache/index.py), when `diffret index` built one: its kind,
    # parameters, the rows it covers, the cache content it was built from and its files' sha256.
    index: dict = field(default_factory=dict)
    # How the stage-1 checkpoint was chosen (extract --select-on): {"on": "last"} or {"on": "val",
    # "val": {"source": "dataset" | "held-out", "fraction", "seed", "video_ids": [...]}, "best": {...}}.
    # Held-out validation videos are not in the train split; they are the cache's "val" split.
    selection: dict = field(default_factory=dict)

    @property
    def fingerprint(self) -> str:
        return str(self.model.get("fingerprint", ""))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Manifest":
        d = dict(d)
        d["shards"] = [ShardRecord(**s) for s in d.get("shards", [])]
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in known})


def held_out_videos(video_ids, fraction: float, seed: int) -> list[str]:
    """The validation videos held out of `video_ids` when a dataset has no validation split of its own:
    round(fraction x n) of them (at least 1 when fraction > 0, always leaving one to train on), drawn
    by a seeded hash of each id, so the choice depends on the ids, the fraction and the seed only
    (not on their order). Stage one (extract) and stage two (train-generator) both use it. -> sorted ids."""
    ids = sorted(set(map(str, video_ids)))
    if fraction <= 0 or len(ids) < 2:
        return []
    n = min(len(ids) - 1, max(1, round(fraction * len(ids))))
    key = lambda v: hashlib.sha256(f"{seed}:{v}".encode()).hexdigest()  # noqa: E731
    return sorted(sorted(ids, key=key)[:n])


def write_manifest(root: Path, manifest: Manifest) -> Path:
    path = Path(root) / MANIFEST_NAME
    atomic_write_text(path, json.dumps(manifest.to_dict(), indent=2, sort_keys=True) + "\n")
    return path


_INT, _NUM, _STR, _OBJ, _LIST = "an integer", "a number", "a string", "an object", "a list"
# The manifest's keys and their JSON types; the required ones first (the others have defaults).
REQUIRED_KEYS = {"schema_version": _INT, "width": _INT, "n_words": _INT, "n_frames": _INT, "model": _OBJ,
                 "extract_config": _OBJ, "splits": _OBJ, "shards": _LIST}
OPTIONAL_KEYS = {"dataset": _STR, "dtype": _STR, "logit_scale": _NUM, "wti_padding": _STR, "files": _OBJ,
                 "index": _OBJ, "selection": _OBJ}
_SHARD_KEYS = {"file": _STR, "kind": _STR, "split": _STR, "rows": _INT, "sha256": _STR}


def _is(value, kind: str) -> bool:
    if kind in (_INT, _NUM) and isinstance(value, bool):  # JSON true is not a number
        return False
    return isinstance(value, {_INT: int, _NUM: (int, float), _STR: str, _OBJ: dict, _LIST: list}[kind])


def _describe(value) -> str:
    kind = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", dict: "an object",
            list: "a list", type(None): "null"}.get(type(value), type(value).__name__)
    return f"{kind} ({json.dumps(value)[:40]})" if not isinstance(value, (dict, list)) else kind


def _check_key(where: str, value, kind: str) -> None:
    if not _is(value, kind):
        raise ValueError(f"{where} must be {kind}, not {_describe(value)}")


def check_manifest_dict(data: dict) -> None:
    """Raise ValueError (one line, naming the key and the expected type) unless `data` has every
    required key of a manifest, each key of the type docs/cache.md gives it."""
    for key, kind in REQUIRED_KEYS.items():
        if key not in data:
            raise ValueError(f"the required key {key!r} ({kind}) is missing")
        _check_key(f"key {key!r}", data[key], kind)
    for key, kind in OPTIONAL_KEYS.items():
        if key in data:
            _check_key(f"key {key!r}", data[key], kind)
    for split, counts in data["splits"].items():
        _check_key(f"splits[{split!r}]", counts, _OBJ)
        for key in ("captions", "videos"):
            if key not in counts:
                raise ValueError(f"splits[{split!r}] lacks the key {key!r} ({_INT})")
            _check_key(f"splits[{split!r}][{key!r}]", counts[key], _INT)
    for i, shard in enumerate(data["shards"]):
        _check_key(f"shards[{i}]", shard, _OBJ)
        for key, kind in _SHARD_KEYS.items():
            if key not in shard:
                raise ValueError(f"shards[{i}] lacks the key {key!r} ({kind})")
            _check_key(f"shards[{i}][{key!r}]", shard[key], kind)
    for name, digest in data.get("files", {}).items():
        _check_key(f"files[{name!r}]", digest, _STR)


def read_manifest(root: Path) -> Manifest:
    """Read and sanity-check `root/manifest.json`; raise CacheError with a one-line reason."""
    root = Path(root)
    path = root / MANIFEST_NAME
    if not root.is_dir():
        raise CacheError(f"{root} is not a directory, so it is not a diffret cache")
    if not path.is_file():
        raise CacheError(f"{root} is not a diffret cache: {MANIFEST_NAME} is missing")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            raise ValueError(f"expected a JSON object, got {type(data).__name__}")
        # The version first: another schema may have other fields, and the version is the news.
        if "schema_version" not in data:
            raise ValueError(f"the required key 'schema_version' ({_INT}) is missing")
        _check_key("key 'schema_version'", data["schema_version"], _INT)
        version = data["schema_version"]
        if version != SCHEMA_VERSION:
            raise CacheError(
                f"{root} has cache schema version {version}, this diffret reads "
                f"version {SCHEMA_VERSION}; re-run `diffret extract` to rebuild it"
            )
        check_manifest_dict(data)
        manifest = Manifest.from_dict(data)
    except (ValueError, TypeError) as e:
        raise CacheError(f"{path} is not a valid cache manifest: {e}") from None
    return manifest


def check_compatible(
    manifest: Manifest, *, width: int | None = None, fingerprint: str | None = None,
    schema_version: int | None = None, cache: str | Path = "the cache", consumer: str = "this consumer",
) -> None:
    """Refuse (CacheError, one line) a cache that does not fit what a consumer was built on.

    Checks, in this order, whichever expectations are given: the cache schema version, the
    feature width D and the stage-1 fingerprint. `cache` and `consumer` only name the two sides
    in the message, e.g. check_compatible(m, width=512, fingerprint=fp, cache=cache_dir,
    consumer=f"the generator in {gen_dir}").
    """
    if schema_version is not None and int(manifest.schema_version) != int(schema_version):
        raise CacheError(
            f"{cache} has cache schema version {manifest.schema_version} but {consumer} expects version "
            f"{schema_version}; rebuild one to match the other"
        )
    if width is not None and int(manifest.width) != int(width):
        raise CacheError(
            f"{cache} holds features of width {manifest.width} but {consumer} expects width {width}; "
            f"they come from different stage-1 models"
        )
    if fingerprint is not None and manifest.fingerprint != str(fingerprint):
        raise CacheError(
            f"{cache} was written by stage-1 model {manifest.fingerprint[:12] or '(unknown)'} but {consumer} "
            f"was built on stage-1 model {str(fingerprint)[:12] or '(unknown)'}; use the matching cache or retrain"
        )


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_checksums(root: Path) -> dict[str, str]:
    """{name: sha256} of the CHECKSUMMED_FILES that `root` holds: what `Manifest.files` records.
    Call it when those files are final, right before the manifest is written."""
    root = Path(root)
    return {name: sha256_file(root / name) for name in CHECKSUMMED_FILES if (root / name).is_file()}
