"""Stage-one fine-tuning epochs: training videos decoded once and kept in memory (`--keep-frames`,
the default) against decoding them again for every caption in every epoch (`--keep-frames 0`).

On a demo set (rendered if absent), `diffret extract` with the demo's stage-one settings (the
Makefile's DEMO_EXTRACT_FLAGS) runs with
--epochs E under both settings and once with --epochs 0 (the dump alone); each setting's seconds per
epoch are (its time - the dump's) / E, from the time the command reports (`... in X s`). The runs
alternate, so both see the same machine; the ratio is the figure. The two give the same losses at
the same thread count (tests/test_kept_frames.py); here the kept run trains on every core and the
decoding run on the cores its workers leave, as the command does.

Usage: python benchmarks/stage1_epochs.py [--train 1000] [--epochs 2] [--json FILE]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from demo_table import makefile_setting  # benchmarks/demo_table.py, beside this script


def demo_flags() -> list[str]:
    """The Makefile's DEMO_EXTRACT_FLAGS without their --epochs (each run sets its own)."""
    toks = shlex.split(makefile_setting("DEMO_EXTRACT_FLAGS"))
    return [t for i, t in enumerate(toks) if t != "--epochs" and (i == 0 or toks[i - 1] != "--epochs")]


def diffret(*args) -> str:
    cmd = [sys.executable, "-m", "diffret.pipeline.cli", *map(str, args)]
    r = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return r.stdout + r.stderr  # the command's messages go to the console (stderr)


def extract(data: Path, out: Path, epochs: int, keep: float) -> float:
    text = diffret("extract", "--dataset", "msrvtt", "--data-root", data, "--out", out, *demo_flags(), "--epochs", epochs,
                   "--keep-frames", keep, "--overwrite")
    m = re.search(r"in ([0-9.]+) s on", " ".join(text.split()))
    if not m:
        raise SystemExit(f"no time in the output of extract:\n{text}")
    return float(m.group(1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train", type=int, default=1000, help="Training videos (four captions each).")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--data", type=Path, default=None, help="An existing demo set (else one is rendered).")
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args()
    load0 = list(os.getloadavg())
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = a.data or tmp / "data"
        if a.data is None:
            diffret("demo-data", data, "--train", a.train, "--test", 100)
        dump = extract(data, tmp / "c0", 0, 4.0)
        kept = extract(data, tmp / "c1", a.epochs, 4.0)
        decoded = extract(data, tmp / "c2", a.epochs, 0.0)
    per = {"kept": (kept - dump) / a.epochs, "decoded": (decoded - dump) / a.epochs}
    result = {"seconds_per_epoch": per, "speedup": per["decoded"] / per["kept"], "dump_seconds": dump,
              "epochs": a.epochs, "train_videos": a.train, "cores": os.cpu_count(),
              "machine": f"{platform.machine()} {platform.processor() or ''}".strip(), "date": time.strftime("%Y-%m-%d"),
              "load_average": {"start": load0, "end": list(os.getloadavg())}}
    print(f"seconds per epoch: kept {per['kept']:.1f}, decoded every epoch {per['decoded']:.1f} "
          f"({result['speedup']:.2f}x); dump alone {dump:.1f} s")
    if a.json:
        a.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
