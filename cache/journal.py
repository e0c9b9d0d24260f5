"""The progress journal of an unfinished cache, which makes extraction resumable.

While `diffret extract` runs, `progress/` in the cache holds `run.json` (the settings of the
run, "config", and the fingerprint of its inputs, "inputs": {"annotations": {file: sha256},
"videos": {path: [size, mtime_ns] or null}}, which a resume must find unchanged) and one JSON
file per finished shard, written atomically right after the shard itself:

    progress/<kind>-<split>-<nnnnn>.json   {"kind", "split", "index", "file" (null: no rows),
        "rows", "sha256", "fingerprint", "shard_rows", "index_rows": [...], "failures": [...]}

A shard is *finished* once its journal entry exists; a re-run keeps those and redoes the rest.
`close()` of the writer turns the journal into the Parquet index and the manifest, then removes
`progress/`. The journal is an internal detail: a complete cache never has one.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

from .atomic import atomic_write_text

PROGRESS_DIR = "progress"
RUN_FILE = "run.json"
FAULT_ENV = "DIFFRET_FAULT"


def fault_point(name: str) -> None:
    """Fault injection for the kill-and-resume tests: SIGKILL this process when the environment
    variable DIFFRET_FAULT equals `name` (e.g. "shard:text-train-00001.h5"). A no-op otherwise."""
    if os.environ.get(FAULT_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)


class Journal:
    """Read and write `root/progress/`."""

    def __init__(self, root: Path):
        self.dir = Path(root) / PROGRESS_DIR

    def exists(self) -> bool:
        return self.dir.is_dir()

    def read_run(self) -> dict | None:
        """The settings recorded by `write_run`, or None (no journal, or an unreadable one)."""
        try:
            return json.loads((self.dir / RUN_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    def write_run(self, info: dict) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.dir / RUN_FILE, json.dumps(info, indent=1, sort_keys=True) + "\n")

    def entries(self) -> list[dict]:
        """Every readable shard entry, sorted by (kind, split, index)."""
        out = []
        for path in sorted(self.dir.glob("*-*-*.json")) if self.exists() else []:
            try:
                e = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue  # a torn entry cannot exist (atomic writes); skip anything odd all the same
            if isinstance(e, dict) and {"kind", "split", "index"} <= e.keys():
                out.append(e)
        return sorted(out, key=lambda e: (e["kind"], e["split"], int(e["index"])))

    def record(self, entry: dict) -> None:
        """Write one shard entry atomically (replaces an older entry of the same shard)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        name = f"{entry['kind']}-{entry['split']}-{int(entry['index']):05d}.json"
        atomic_write_text(self.dir / name, json.dumps(entry, separators=(",", ":")) + "\n")

    def forget(self, entry: dict) -> None:
        name = f"{entry['kind']}-{entry['split']}-{int(entry['index']):05d}.json"
        (self.dir / name).unlink(missing_ok=True)

    def clear(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
