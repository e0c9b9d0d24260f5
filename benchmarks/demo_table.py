"""The demo's results table: rows discriminative, diffusion, dsl, qbnorm; in domain and out of
domain; mean +- std over seeds. Runs the real `diffret` commands (resumable: finished steps are
skipped when their output exists; OUT/settings.json records the settings, and a run with other
settings into the same OUT is refused rather than mixed with the old results).

The data is fixed (one demo set, `--data-seed`, 0 by default) and the training seed varies: for each
seed s, stage one and stage two are both seeded with s (with --stage1-seed N every seed uses the
stage-1 model and caches of seed N, so only stage two varies). A fixed test split makes the rows
paired comparisons on the same queries, as on a real benchmark; the std is what training noise
alone moves a figure by.

    extract          data/          -> s<s>/cache            (fine-tunes stage one; with --stage1-from DIR,
                                                              dumps with DIR/s<s>/cache/stage1.pt instead)
    extract --stage1 data-shifted/  -> s<s>/cache-shifted    (the same stage-1 model, no training)
    train-generator  s<s>/cache     -> s<s>/generator
    evaluate --dsl --qb-norm        on s<s>/cache (in domain) and s<s>/cache-shifted (out of domain)

The demo's settings are written once, in the Makefile (DEMO_EXTRACT_FLAGS, DEMO_GENERATOR_FLAGS,
DEMO_EVAL_FLAGS), which `make demo` uses and this script reads; the data sizes are `diffret
demo-data`'s defaults (pipeline/demo.py DemoConfig).

Usage: python benchmarks/demo_table.py [--out runs/demo-table] [--seeds 0,1,2,3,4]
Writes OUT/table.md and OUT/table.json: each row's mean +- std over the seeds, and each row minus the same
seed's discriminative row (the paired effect, whose spread is what a comparison has to beat).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

from diffret.pipeline.demo import DemoConfig

ROWS = ("discriminative", "diffusion", "dsl", "qbnorm")
# An extra diffusion row trained with other stage-2 settings (train-generator flags). On the demo a
# generator trained with K = 128 candidates (the original) is at chance when it re-ranks K = 32 at
# inference (alone, alpha 100: t2v R@1 3%), yet matches stage one over K = 128 or the whole gallery;
# training with K = 32, the inference K, makes the top-32 re-ranking learn (alone: 23%).
VARIANT = "--candidates 32 --epochs 10 --lr 1e-3"
COLUMNS = (("t2v", "R@1"), ("t2v", "R@5"), ("v2t", "R@1"), ("v2t", "R@5"), (None, "Rsum"))
MAKEFILE = Path(__file__).resolve().parents[1] / "Makefile"


def makefile_setting(name: str, makefile: Path = MAKEFILE) -> str:
    """The value of `NAME ?= value` in the Makefile (continued lines joined as make does): the demo's
    settings live there, once."""
    for line in re.sub(r"\s*\\\n\s*", " ", makefile.read_text()).splitlines():
        m = re.match(rf"{re.escape(name)}\s*\?=(.*)$", line)
        if m:
            return m.group(1).strip()
    raise SystemExit(f"{makefile} sets no {name}")


# Flags of `extract` that decide which frames and words a cache holds: the shifted set's dump must
# sample as the model's own cache did (--stage1 takes only the model from the checkpoint).
SAMPLING_FLAGS = ("--fps", "--frames", "--words", "--frame-rule", "--frame-padding", "--end-second")


def sampling_flags(extract_flags: str) -> list[str]:
    toks, out = shlex.split(extract_flags), []
    for i, t in enumerate(toks):
        if t in SAMPLING_FLAGS and i + 1 < len(toks):
            out += [t, toks[i + 1]]
    return out


def check_settings(out: Path, settings: dict) -> None:
    """Record `settings` in OUT/settings.json, or refuse (one line) if OUT holds results of others."""
    path = out / "settings.json"
    if path.is_file():
        saved = json.loads(path.read_text())
        diff = [k for k in sorted(set(saved) | set(settings)) if saved.get(k) != settings.get(k)]
        if diff:
            raise SystemExit(f"{out} holds results made with other settings ({', '.join(diff)}: "
                             f"{saved.get(diff[0])!r}, now {settings.get(diff[0])!r}); use another --out or remove it")
    else:
        path.write_text(json.dumps(settings, indent=2) + "\n")


def diffret(*args) -> None:
    cmd = [sys.executable, "-m", "diffret.pipeline.cli", *map(str, args)]
    print("+ diffret", " ".join(map(str, args)), flush=True)
    subprocess.run(cmd, check=True)


def _flag(flags: str, name: str, default):
    toks = shlex.split(flags)
    return toks[toks.index(name) + 1] if name in toks else default


def run_seed(out: Path, seed: int, a) -> dict:
    d = out / f"s{seed}"
    s1 = seed if a.stage1_seed is None else a.stage1_seed  # whose stage-1 model (and caches) to use
    cache, shifted, gen = out / f"s{s1}" / "cache", out / f"s{s1}" / "cache-shifted", d / "generator"
    if not (cache / "manifest.json").is_file():
        if a.stage1_from:  # the stage-1 model of an earlier run (a --stage1-only check on the same training split)
            diffret("extract", "--dataset", "msrvtt", "--data-root", out / "data", "--out", cache,
                    "--stage1", a.stage1_from / f"s{s1}" / "cache" / "stage1.pt", *sampling_flags(a.extract_flags),
                    "--overwrite")
        else:
            diffret("extract", "--dataset", "msrvtt", "--data-root", out / "data", "--out", cache, "--seed", s1,
                    *shlex.split(a.extract_flags), "--overwrite")
    if a.stage1_only:  # the instrument check: stage one's rows in domain, nothing trained after it
        path = d / "in_domain.json"
        if not path.is_file():
            diffret("evaluate", "--cache", cache, "--dsl", "--qb-norm", "--json", path)
        return {"in_domain": json.loads(path.read_text())["results"]}
    if not (shifted / "manifest.json").is_file():
        diffret("extract", "--dataset", "msrvtt", "--data-root", out / "data-shifted", "--out", shifted,
                "--stage1", cache / "stage1.pt", *sampling_flags(a.extract_flags), "--overwrite")
    epochs = int(_flag(a.generator_flags, "--epochs", 5))
    meta = json.loads((gen / "generator.json").read_text()) if (gen / "generator.json").is_file() else {}
    if meta.get("epochs_done", 0) < epochs:  # not trained, or interrupted
        diffret("train-generator", "--cache", cache, "--out", gen, "--seed", seed, *shlex.split(a.generator_flags),
                "--overwrite")  # an interrupted run starts over
    results = {}
    for name, c in (("in_domain", cache), ("out_of_domain", shifted)):
        path = d / f"{name}.json"
        if not path.is_file():
            diffret("evaluate", "--cache", c, "--generator", gen, "--dsl", "--qb-norm", "--seed", seed,
                    *shlex.split(a.eval_flags), "--json", path)
        results[name] = json.loads(path.read_text())["results"]
    if a.variant_flags:
        vgen = d / "generator-variant"
        meta = json.loads((vgen / "generator.json").read_text()) if (vgen / "generator.json").is_file() else {}
        if meta.get("epochs_done", 0) < int(_flag(a.variant_flags, "--epochs", 5)):
            diffret("train-generator", "--cache", cache, "--out", vgen, "--seed", seed, *shlex.split(a.variant_flags),
                    "--overwrite")
        for name, c in (("in_domain", cache), ("out_of_domain", shifted)):
            path = d / f"{name}-variant.json"
            if not path.is_file():
                diffret("evaluate", "--cache", c, "--generator", vgen, "--seed", seed, *shlex.split(a.eval_flags),
                        "--json", path)
            results[name]["diffusion-variant"] = json.loads(path.read_text())["results"]["diffusion"]
    return results


def value(res: dict, row: str, d: str | None, m: str) -> float:
    r = res[row]
    return r[m] if d is None else r[d][m]


def aggregate(per_seed: list[dict], rows=ROWS) -> dict:
    """-> {setting: {row: {"t2v R@1": [mean, std], ...}}} (std with n-1; 0 for one seed)."""
    table = {}
    for setting in [s for s in ("in_domain", "out_of_domain") if s in per_seed[0]]:
        table[setting] = {}
        for row in rows:
            cells = {}
            for d, m in COLUMNS:
                xs = [value(s[setting], row, d, m) for s in per_seed]
                cells[f"{d} {m}" if d else m] = [statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0]
            table[setting][row] = cells
    return table


PAIRED = (("t2v", "R@1"), ("v2t", "R@1"), (None, "Rsum"))


def paired(per_seed: list[dict], rows=ROWS, base: str = "discriminative") -> dict:
    """-> {setting: {row: {"t2v R@1": [mean, std], ...}}} of each seed's row minus its own `base` row:
    the effect of a reviser or the generator on the same stage-1 model and queries, whose spread over
    seeds is what a comparison between rows has to beat (much less than a row's own spread)."""
    out = {}
    for setting in [s for s in ("in_domain", "out_of_domain") if s in per_seed[0]]:
        out[setting] = {}
        for row in [r for r in rows if r != base]:
            cells = {}
            for d, m in PAIRED:
                xs = [value(s[setting], row, d, m) - value(s[setting], base, d, m) for s in per_seed]
                cells[f"{d} {m}" if d else m] = [statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0]
            out[setting][row] = cells
    return out


def paired_markdown(diffs: dict, n: int, variant: str = "") -> str:
    heads = [f"{d} {m}" if d else m for d, m in PAIRED]
    lines = [f"each row minus the same seed's discriminative row, mean +- std over {n} seeds:", "",
             "| setting | row | " + " | ".join(heads) + " |", "|---" * (len(heads) + 2) + "|"]
    for setting, rows in diffs.items():
        for row, c in rows.items():
            label = f"diffusion ({variant})" if row == "diffusion-variant" else row
            lines.append(f"| {setting.replace('_', ' ')} | {label} | "
                         + " | ".join(f"{c[h][0]:+.1f} +- {c[h][1]:.1f}" for h in heads) + " |")
    return "\n".join(lines + [""])


def markdown(table: dict, n: int, variant: str = "") -> str:
    heads = [f"{d} {m}" if d else m for d, m in COLUMNS]
    lines = []
    for setting, title in (("in_domain", "in domain (demo test split)"),
                           ("out_of_domain", "out of domain (`--shifted` test split, same stage-1 model)")):
        if setting not in table:
            continue
        lines += [f"{title}, mean +- std over {n} seeds:", "", "| row | " + " | ".join(heads) + " |",
                  "|---" * (len(heads) + 1) + "|"]
        for row in table[setting]:
            c = table[setting][row]
            label = f"diffusion ({variant})" if row == "diffusion-variant" else row
            lines.append(f"| {label} | " + " | ".join(f"{c[h][0]:.1f} +- {c[h][1]:.1f}" for h in heads) + " |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/demo-table"))
    p.add_argument("--seeds", default="0,1,2,3,4", help="Training seeds (stage one and two).")
    p.add_argument("--data-seed", type=int, default=0, help="Seed of the demo set (the same for every training seed).")
    p.add_argument("--train", type=int, default=DemoConfig.n_train)
    p.add_argument("--test", type=int, default=DemoConfig.n_test)
    p.add_argument("--extract-flags", default=makefile_setting("DEMO_EXTRACT_FLAGS"))
    p.add_argument("--generator-flags", default=makefile_setting("DEMO_GENERATOR_FLAGS"))
    p.add_argument("--eval-flags", default=makefile_setting("DEMO_EVAL_FLAGS"))
    p.add_argument("--variant-flags", default=VARIANT,
                   help="train-generator flags of an extra diffusion row ('' for none).")
    p.add_argument("--stage1-seed", type=int, default=None,
                   help="Share the stage-1 model of this seed across all seeds (only stage two varies).")
    p.add_argument("--stage1-from", type=Path, default=None,
                   help="Take seed s's stage-1 model from DIR/s<s>/cache/stage1.pt (an earlier run of this script "
                        "with the same extract flags and training split, e.g. a --stage1-only check) and dump the "
                        "demo set with it instead of training stage one again.")
    p.add_argument("--stage1-only", action="store_true",
                   help="Stage one's rows in domain only (discriminative, dsl, qbnorm): checks the demo's noise.")
    a = p.parse_args()
    t0, load0 = time.time(), list(os.getloadavg())
    a.out.mkdir(parents=True, exist_ok=True)
    check_settings(a.out, {"train": a.train, "test": a.test, "data_seed": a.data_seed, "extract": a.extract_flags,
                           "generator": a.generator_flags, "eval": a.eval_flags, "variant": a.variant_flags,
                           "stage1_seed": a.stage1_seed, "stage1_only": a.stage1_only,
                           "stage1_from": str(a.stage1_from) if a.stage1_from else None})
    for name, extra in (("data", []), ("data-shifted", ["--shifted"])):
        if not (a.out / name / "demo.json").is_file():  # demo.json is written last
            diffret("demo-data", a.out / name, "--train", a.train, "--test", a.test, "--seed", a.data_seed, *extra)
    seeds = [int(s) for s in a.seeds.split(",")]
    per_seed = [run_seed(a.out, s, a) for s in seeds]
    rows = ROWS + (("diffusion-variant",) if a.variant_flags else ())
    if a.stage1_only:
        rows = ("discriminative", "dsl", "qbnorm")
    table, diffs = aggregate(per_seed, rows), paired(per_seed, rows)
    md = markdown(table, len(seeds), a.variant_flags) + "\n" + paired_markdown(diffs, len(seeds), a.variant_flags)
    (a.out / "table.md").write_text(md)
    (a.out / "table.json").write_text(json.dumps({
        "table": table, "paired": diffs, "per_seed": dict(zip(map(str, seeds), per_seed)), "seeds": seeds,
        "flags": {"extract": a.extract_flags, "generator": a.generator_flags, "eval": a.eval_flags,
                  "variant": a.variant_flags},
        "stage1_seed": a.stage1_seed, "stage1_from": str(a.stage1_from) if a.stage1_from else None,
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(), "seconds": round(time.time() - t0),
        "date": time.strftime("%Y-%m-%d"), "load_average": {"start": load0, "end": list(os.getloadavg())},
    }, indent=2) + "\n")
    print(md)
    print(f"written to {a.out / 'table.md'} and {a.out / 'table.json'} in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
