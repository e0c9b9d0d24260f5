"""`diffret cache info`: what a cache holds, from its manifest and file sizes (no tensor reads)."""
from __future__ import annotations

from pathlib import Path

from .layout import FAILURES_FILE, read_failures
from .manifest import read_manifest


def cache_info(root: Path) -> dict:
    """Splits with caption / video counts and shard bytes, widths, model, dtype, sizes on disk."""
    root = Path(root)
    m = read_manifest(root)
    splits = {s: {"captions": c.get("captions", 0), "videos": c.get("videos", 0), "text_shards": 0,
                  "video_shards": 0, "bytes": 0} for s, c in m.splits.items()}
    for rec in m.shards:
        s = splits.setdefault(rec.split, {"captions": 0, "videos": 0, "text_shards": 0, "video_shards": 0, "bytes": 0})
        s[f"{rec.kind}_shards"] += 1
        path = root / rec.file
        s["bytes"] += path.stat().st_size if path.is_file() else 0
    cfg = m.extract_config or {}
    return {
        "path": str(root), "schema_version": m.schema_version, "dataset": m.dataset,
        "model": dict(m.model), "activation": str(m.model.get("activation", "")),
        "width": m.width, "n_words": m.n_words, "n_frames": m.n_frames, "dtype": m.dtype,
        "logit_scale": m.logit_scale, "splits": splits, "shards": len(m.shards),
        "failures": len(read_failures(root)) if (root / FAILURES_FILE).is_file() else None,
        "extract_config": {k: cfg[k] for k in ("epochs", "frames", "words", "target_fps", "pretrained") if k in cfg},
        "bytes": sum(p.stat().st_size for p in root.rglob("*") if p.is_file()),
    }


def human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"
