"""The options of `diffret serve`, written once: each field's metadata is its command-line option
(pipeline/commands/options.py), and the same dataclass configures `create_app` from Python."""
from __future__ import annotations

from dataclasses import dataclass, field

from diffret.cache.numbers import check_numbers

LOOPBACK = ("127.0.0.1", "localhost", "::1")


ALL = -1  # candidates: every video of the collection


def _parse_candidates(text: str) -> int:
    if str(text).lower() == "all":
        return ALL
    if str(text).isdigit() and int(text) > 0:
        return int(text)
    raise ValueError(f"--candidates must be a positive number or 'all', got {text!r}")


@dataclass
class ServeOptions:
    """Where `diffret serve` listens and the bounds it keeps under load and hostile requests."""

    host: str = field(default="127.0.0.1", metadata={
        "help": "Address to bind. Anything but loopback lets anyone on the network search and watch."})
    port: int = field(default=8080, metadata={"help": "Port to listen on (0: any free port)."})
    k: int = field(default=12, metadata={"help": "Results a page search asks for by default."})
    max_k: int = field(default=100, metadata={
        "help": "Most results one request may ask for (larger k, or k past the collection size, is clamped)."})
    thumb_width: int = field(default=320, metadata={"help": "Width of a thumbnail, pixels (never upscaled)."})
    thumb_cache_mb: float = field(default=64.0, metadata={
        "help": "MiB of JPEG thumbnails kept in memory (least recently used dropped first)."})
    device: str = field(default="cpu", metadata={"help": "Device of the query encoder and the generator."})
    split: str = field(default="all", metadata={"help": "Which videos of the caches to serve: a split or 'all'."})
    candidates: int | None = field(default=None, metadata={
        "type": str, "parse": lambda t: _parse_candidates(t), "format": lambda n: n,
        "show_default": "the Searcher's: 1000 with an index, every video without one",
        "help": "First-stage candidates re-scored by exact WTI, or 'all' (exhaustive: exact, and on a collection "
                "not much larger than the candidates also cheaper than the index)."})
    batch: int = field(default=32, metadata={
        "help": "Most searches answered by one Searcher call (those that arrive while one runs; 1: one at a time)."})
    threads: int = field(default=1, metadata={
        "help": "torch threads of a search (1: the other cores serve requests and decode thumbnails while it runs; "
                "searches that arrive together are batched instead)."})

    def __post_init__(self):
        check_numbers(self, {"port": ">=0", "k": ">=1", "max_k": ">=1", "thumb_width": ">=1", "thumb_cache_mb": ">=0",
                             "threads": ">=1", "batch": ">=1"})
        if self.port > 65535:
            raise ValueError(f"--port must be in [0, 65535], got {self.port}")
        if self.k > self.max_k:
            raise ValueError(f"--k ({self.k}) must be <= --max-k ({self.max_k})")

    @property
    def is_loopback(self) -> bool:
        return self.host in LOOPBACK or self.host.startswith("127.")
