"""The number rules of the config dataclasses (ExtractConfig, GeneratorConfig, EvalOptions, SweepGrid):
every number a config holds is a finite number, and each field may have a range. Checked in the
dataclasses' own validation, so the command line and Python callers get the same one-line
ValueError, before any work. (Here because every layer may import cache/; it imports nothing.)

    check_numbers(cfg, {"lr": ">0", "warmup": "[0,1]", "epochs": ">=0"})

Every int or float field (also `| None`, and tuples / lists of numbers) must be a finite number
(or None where the type allows it); the fields named in `rules` must also satisfy their rule.
Messages name the field's command-line flag (its metadata "flag", else --field-name).
"""
from __future__ import annotations

import math
from dataclasses import fields

# The largest factor a score matrix may be multiplied by (evaluate --alpha, --temp, --dsl-temp,
# --qb-beta): the scores are float32 in about [-1, 1], so a larger factor overflows to inf or leaves
# no trace of the stage-1 order in the sum.
MAX_FACTOR = 1e6

RULES = {
    ">0": (lambda v: v > 0, "> 0"),
    ">=0": (lambda v: v >= 0, ">= 0"),
    ">=1": (lambda v: v >= 1, ">= 1"),
    ">=2": (lambda v: v >= 2, ">= 2"),
    "[0,1]": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "[0,1)": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "factor": (lambda v: 0 < v <= MAX_FACTOR, f"in (0, {MAX_FACTOR:g}]"),
    "|factor|": (lambda v: abs(v) <= MAX_FACTOR, f"within +-{MAX_FACTOR:g}"),
}


def flag_of(f) -> str:
    """The command-line name of dataclass field `f` (its first flag)."""
    flags = f.metadata.get("flag", "--" + f.name.replace("_", "-"))
    return flags if isinstance(flags, str) else flags[0]


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def check_numbers(cfg, rules: dict[str, str] | None = None) -> None:
    """ValueError (one line) for the first number field of dataclass `cfg` that is not a finite number
    or breaks its rule in `rules` (field -> a key of RULES; a list field: each value)."""
    rules = rules or {}
    for f in fields(cfg):
        kind = str(f.type)
        if not any(t in kind for t in ("int", "float")) or "str" in kind or kind == "bool":
            continue
        value = getattr(cfg, f.name)
        if value is None and "None" in kind:
            continue
        values = list(value) if isinstance(value, (list, tuple)) else [value]
        for v in values:
            if not _is_number(v):
                raise ValueError(f"{flag_of(f)} must be a finite number, got {v!r}")
            if f.name in rules:
                ok, text = RULES[rules[f.name]]
                if not ok(v):
                    raise ValueError(f"{flag_of(f)} must be {text}, got {v:g}")
