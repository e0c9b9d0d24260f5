"""Output paths checked before any work: a command that will write a file (evaluate --json,
--save-sims) or a folder (train-generator --out, sweep --out) refuses a path it cannot use with one
line, before it trains or scores anything, instead of a traceback after the work."""
from __future__ import annotations

import os
from pathlib import Path


def check_output_path(path, option: str, folder: bool) -> Path:
    """ValueError (one line) unless `path` can be written as a folder (`folder`) or a file: a folder
    given for a file, a file for a folder, a file among its parents, a parent that cannot be written.
    `option` names it in the message (e.g. "--json"). -> Path(path)."""
    p = Path(path)
    if folder and p.exists() and not p.is_dir():
        raise ValueError(f"{option} {p} is a file, not a folder")
    if not folder and p.is_dir():
        raise ValueError(f"{option} {p} is a folder; give a file name")
    ancestor = p if folder and p.is_dir() else p.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if ancestor.exists() and not ancestor.is_dir():
        raise ValueError(f"{option} {p}: {ancestor} is a file, not a folder")
    if ancestor.is_dir() and not os.access(ancestor, os.W_OK | os.X_OK):
        raise ValueError(f"{option} {p}: cannot write in {ancestor}")
    return p
