"""Synthetic video-text retrieval data in the MSRVTT on-disk layout.

``make_demo_dataset`` renders short H.264 clips of coloured shapes that move
over simple backgrounds and writes captions composed from the attributes
(shape, colour, size, direction, and the order of two events).  The result
reads like MSRVTT (``MSRVTT_data.json``, ``MSRVTT_train.9k.csv``,
``MSRVTT_JSFUSION_test.csv``, ``videos/*.mp4``), so the real loaders, feature
extractors and retrieval models can be exercised end to end in seconds,
without downloading anything.  Retrieval needs both appearance and temporal
order: "X moves left, then Y appears" and "Y appears, then X moves left" are
different videos.  ``shifted=True`` gives an out-of-domain variant with unseen
backgrounds and new phrasings over the same attribute vocabulary.

One concept despite its length (about 330 lines): the demo set's vocabulary, its captions and the
rendering of its clips are one generator of paired data, changed together.
"""
from __future__ import annotations

import csv
import json
import multiprocessing as mp
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import av
import numpy as np

from diffret.cache.numbers import check_numbers

SHAPES = ("circle", "square", "triangle", "diamond", "cross", "star")
COLOURS = {
    "red": (230, 30, 30), "orange": (255, 140, 0), "yellow": (245, 230, 30),
    "green": (30, 200, 50), "cyan": (0, 220, 230), "blue": (40, 80, 255),
    "purple": (170, 50, 230), "white": (245, 245, 245),
}
SIZES = {"small": 0.11, "large": 0.20}  # radius as a fraction of the frame side
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
EVENTS = ("appears", "disappears")
SINGLE_OBJECT_P = 0.2   # share of clips with one moving object and no second event
TRAIN_CAPTIONS = 4      # paraphrases per train video

# Backgrounds are dark/muted so every object colour stays clearly visible.
PALETTE = [(20, 20, 24), (55, 55, 60), (35, 45, 70), (70, 52, 38), (28, 62, 58), (58, 40, 60)]
SHIFTED_PALETTE = [(120, 120, 110), (95, 105, 120), (110, 95, 80), (80, 92, 70), (125, 105, 118), (70, 80, 95)]
BACKGROUNDS = ("plain", "gradient", "clouds")
SHIFTED_BACKGROUNDS = ("stripes", "checker", "radial", "grain")

WORDS = {
    False: {
        "shape": {"circle": ["circle", "round shape", "disc"], "square": ["square", "box", "block"],
                  "triangle": ["triangle", "triangular shape"], "diamond": ["diamond", "rhombus"],
                  "cross": ["cross", "plus sign"], "star": ["star", "star shape"]},
        "size": {"small": ["small", "little", "tiny"], "large": ["large", "big"]},
        "move": ["moves", "slides", "travels", "goes"],
        "moving": ["moving", "sliding", "travelling", "going"],
        "direction": {"left": ["left", "to the left", "leftward"], "right": ["right", "to the right", "rightward"],
                      "up": ["up", "upward", "upwards"], "down": ["down", "downward", "downwards"]},
        "appears": ["appears", "shows up", "pops up"],
        "disappears": ["disappears", "vanishes", "goes away"],
        "single": ["{A} {move} {dir}", "{A} {moving} {dir}", "there is {A} {moving} {dir}", "{A} that {move} {dir}"],
        "double": ["{X}, then {Y}", "first {X}, then {Y}", "{X} and then {Y}", "{X}; afterwards {Y}", "{Y} after {X}"],
    },
    True: {  # out-of-domain phrasing: same attribute words, new verbs and templates
        "shape": {s: [s] for s in SHAPES},
        "size": {"small": ["small"], "large": ["large"]},
        "move": ["drifts", "glides", "heads", "shifts"],
        "moving": ["drifting", "gliding", "heading", "shifting"],
        "direction": {"left": ["leftwards", "toward the left"], "right": ["rightwards", "toward the right"],
                      "up": ["toward the top", "skyward"], "down": ["toward the bottom", "earthward"]},
        "appears": ["emerges", "comes into view", "materializes"],
        "disappears": ["fades away", "leaves the scene", "is removed"],
        "single": ["clip of {A} {moving} {dir}", "we see {A} {moving} {dir}", "{A} {move} {dir} across the frame",
                   "here {A} {move} {dir}"],
        "double": ["{X}; next, {Y}", "in this clip {X} and later {Y}", "{X}, after which {Y}", "{Y} once {X}",
                   "to begin, {X}; subsequently {Y}"],
    },
}


# ---------------------------------------------------------------- attributes
def pick(rng: np.random.Generator, seq):
    return seq[int(rng.integers(len(seq)))]


def sample_attributes(rng: np.random.Generator) -> dict:
    """One clip: object A moves; optionally object B appears/disappears before or after."""
    a = {"shape": pick(rng, SHAPES), "colour": pick(rng, list(COLOURS)), "size": pick(rng, list(SIZES)),
         "direction": pick(rng, list(DIRECTIONS))}
    if rng.random() < SINGLE_OBJECT_P:
        return {"a": a, "b": None, "event": None, "order": None}
    b = {"shape": pick(rng, SHAPES), "colour": pick(rng, [c for c in COLOURS if c != a["colour"]]),
         "size": pick(rng, list(SIZES))}
    return {"a": a, "b": b, "event": pick(rng, EVENTS), "order": pick(rng, ("move_first", "event_first"))}


# ------------------------------------------------------------------ captions
def with_article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def object_phrase(obj: dict, words: dict, rng: np.random.Generator) -> str:
    size = pick(rng, words["size"][obj["size"]])
    return with_article(f"{size} {obj['colour']} {pick(rng, words['shape'][obj['shape']])}")


def compose_caption(attrs: dict, words: dict, rng: np.random.Generator) -> str:
    a, direction = attrs["a"], pick(rng, words["direction"][attrs["a"]["direction"]])
    if attrs["b"] is None:
        return pick(rng, words["single"]).format(A=object_phrase(a, words, rng), move=pick(rng, words["move"]),
                                                 moving=pick(rng, words["moving"]), dir=direction)
    move = f"{object_phrase(a, words, rng)} {pick(rng, words['move'])} {direction}"
    event = f"{object_phrase(attrs['b'], words, rng)} {pick(rng, words[attrs['event']])}"
    first, second = (move, event) if attrs["order"] == "move_first" else (event, move)
    return pick(rng, words["double"]).format(X=first, Y=second)


def paraphrases(attrs: dict, n: int, words: dict, rng: np.random.Generator) -> list[str]:
    """Up to ``n`` distinct captions for one clip (the vocabulary allows far more than 4)."""
    out: list[str] = []
    for _ in range(20 * n):
        caption = compose_caption(attrs, words, rng)
        if caption not in out:
            out.append(caption)
        if len(out) == n:
            break
    return out


# ------------------------------------------------------------------- drawing
def shape_mask(shape: str, cx: float, cy: float, r: float, xx: np.ndarray, yy: np.ndarray) -> np.ndarray:
    dx, dy = xx - cx, yy - cy
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        return np.maximum(abs(dx), abs(dy)) <= 0.85 * r
    if shape == "diamond":
        return abs(dx) + abs(dy) <= 1.1 * r
    if shape == "cross":
        arm = 0.36 * r
        return ((abs(dx) <= arm) & (abs(dy) <= r)) | ((abs(dy) <= arm) & (abs(dx) <= r))
    if shape == "triangle":  # apex up
        top, base = -r, 0.8 * r
        return (dy >= top) & (dy <= base) & (abs(dx) <= r * (dy - top) / (base - top))
    if shape == "star":  # five points, tip up
        k = ((np.arctan2(dy, dx) + np.pi / 2) / (2 * np.pi / 5)) % 1.0
        return np.hypot(dx, dy) <= r * (0.45 + 0.55 * abs(1 - 2 * k))
    raise ValueError(f"unknown shape {shape!r}")


def draw(frame: np.ndarray, shape: str, cx: float, cy: float, r: float, colour: np.ndarray) -> None:
    """Blend an anti-aliased shape (2x2 supersampled coverage) into ``frame`` in place, inside its bounding box."""
    h, w = frame.shape[:2]
    x0, x1 = max(0, int(cx - r) - 1), min(w, int(cx + r) + 2)
    y0, y1 = max(0, int(cy - r) - 1), min(h, int(cy + r) + 2)
    xs = x0 + (np.arange(2 * (x1 - x0), dtype=np.float32) + 0.5) / 2
    ys = y0 + (np.arange(2 * (y1 - y0), dtype=np.float32) + 0.5) / 2
    cover = shape_mask(shape, cx, cy, r, xs[None, :], ys[:, None]).astype(np.float32)
    alpha = cover.reshape(y1 - y0, 2, x1 - x0, 2).mean(axis=(1, 3))[..., None]
    patch = frame[y0:y1, x0:x1]
    patch[:] = patch * (1 - alpha) + colour * alpha


def background(kind: str, size: int, palette, rng: np.random.Generator) -> np.ndarray:
    c1, c2 = (np.array(palette[i], np.float32) for i in rng.choice(len(palette), 2, replace=False))
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    if kind == "plain":
        return np.broadcast_to(c1, (size, size, 3)).copy()
    if kind == "gradient":
        angle = rng.uniform(0, 2 * np.pi)
        t = (np.cos(angle) * (xx - 0.5) + np.sin(angle) * (yy - 0.5)) / 1.42 + 0.5
        return c1 + (c2 - c1) * t[..., None]
    if kind == "clouds":  # smooth value noise: a coarse random grid, bilinearly upsampled
        g = rng.uniform(-1, 1, (5, 5)).astype(np.float32)
        u, v = xx * 4, yy * 4
        i, j = np.minimum(u.astype(int), 3), np.minimum(v.astype(int), 3)
        fu, fv = u - i, v - j
        n = (g[j, i] * (1 - fu) + g[j, i + 1] * fu) * (1 - fv) + (g[j + 1, i] * (1 - fu) + g[j + 1, i + 1] * fu) * fv
        return c1 + 30 * n[..., None]
    if kind == "stripes":
        period, angle = rng.uniform(0.1, 0.22), pick(rng, (0.0, np.pi / 4, np.pi / 2, 3 * np.pi / 4))
        t = (np.cos(angle) * xx + np.sin(angle) * yy) / period
        return np.where((t % 1.0 < 0.5)[..., None], c1, c2)
    if kind == "checker":
        cell = rng.uniform(0.07, 0.16)
        return np.where((((xx // cell) + (yy // cell)) % 2 == 0)[..., None], c1, c2)
    if kind == "radial":
        t = np.clip(np.hypot(xx - rng.uniform(0.3, 0.7), yy - rng.uniform(0.3, 0.7)) / 0.7, 0, 1)
        return c1 + (c2 - c1) * t[..., None]
    if kind == "grain":
        return c1 + rng.uniform(-40, 40, (size, size, 1)).astype(np.float32)
    raise ValueError(f"unknown background {kind!r}")


def layout(attrs: dict, size: int, rng: np.random.Generator):
    """Start/end centres of A and the centre of B: A and B use opposite lanes, so they never overlap."""
    r_a = SIZES[attrs["a"]["size"]] * size
    dx, dy = DIRECTIONS[attrs["a"]["direction"]]
    lane_a, lane_b = (0.25, 0.75) if rng.random() < 0.5 else (0.75, 0.25)
    across = lambda lane: (lane + rng.uniform(-0.03, 0.03)) * size  # noqa: E731
    margin, travel = r_a + 0.04 * size, 0.45 * size
    lo = rng.uniform(margin, size - margin - travel)
    s, e = (lo, lo + travel) if dx + dy > 0 else (lo + travel, lo)
    a_across = across(lane_a)
    start, end = ((s, a_across), (e, a_across)) if dx else ((a_across, s), (a_across, e))
    b_pos = None
    if attrs["b"] is not None:
        r_b = SIZES[attrs["b"]["size"]] * size
        along = rng.uniform(r_b + 0.04 * size, size - r_b - 0.04 * size)
        b_pos = (along, across(lane_b)) if dx else (across(lane_b), along)
    return start, end, b_pos


def render_frames(attrs: dict, size: int, n_frames: int, shifted: bool, seed: list) -> np.ndarray:
    """Frames (T, H, W, 3) uint8.  Two halves: A moves in one, B's event happens in the other."""
    rng = np.random.default_rng(seed)
    kinds, palette = (SHIFTED_BACKGROUNDS, SHIFTED_PALETTE) if shifted else (BACKGROUNDS, PALETTE)
    bg = background(pick(rng, kinds), size, palette, rng)
    start, end, b_pos = layout(attrs, size, rng)
    jitter = lambda name: np.clip(np.array(COLOURS[name], np.float32) + rng.uniform(-12, 12, 3), 0, 255)  # noqa: E731
    col_a = jitter(attrs["a"]["colour"])
    col_b = jitter(attrs["b"]["colour"]) if attrs["b"] else None
    half = n_frames // 2
    move_span = {None: (0, n_frames), "move_first": (0, half), "event_first": (half, n_frames)}[attrs["order"]]
    event_frame = (half if attrs["order"] == "move_first" else 0) + max(1, half // 4)
    frames = np.empty((n_frames, size, size, 3), np.uint8)
    for t in range(n_frames):
        frame = bg.copy()
        if attrs["b"] is not None:
            visible = t >= event_frame if attrs["event"] == "appears" else t < event_frame
            if visible:
                draw(frame, attrs["b"]["shape"], *b_pos, SIZES[attrs["b"]["size"]] * size, col_b)
        u = np.clip((t - move_span[0]) / max(1, move_span[1] - move_span[0] - 1), 0, 1)
        cx, cy = (start[0] + (end[0] - start[0]) * u, start[1] + (end[1] - start[1]) * u)
        draw(frame, attrs["a"]["shape"], cx, cy, SIZES[attrs["a"]["size"]] * size, col_a)
        frames[t] = np.clip(frame + 0.5, 0, 255)
    return frames


# ------------------------------------------------------------------ encoding
def write_mp4(path: Path, frames: np.ndarray, fps: int) -> None:
    """H.264 (libx264, yuv420p), single-threaded so the bitstream is reproducible.

    The thread count goes in the options x264 is opened with: set on the codec context only, it
    was not applied, and threaded encoding gave other bytes about one time in a hundred under load.
    Even so, encoding the same frames 1,000 times in one process gives other bytes 1 to 4 times (at
    fixed positions in the sequence; decoded, up to 15 levels apart on a few percent of the pixels),
    also with the colour conversion done in numpy and explicit timestamps: a rare encoder
    nondeterminism not found yet, which tests/test_demo.py bounds rather than hides.
    """
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=fps, options={"crf": "18", "preset": "fast", "threads": "1"})
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.codec_context.thread_count = 1
        for array in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")))
        container.mux(stream.encode())


def render_video(job: dict) -> int:
    """Worker entry point: render one clip and write it; returns its index."""
    frames = render_frames(job["attrs"], job["size"], job["frames"], job["shifted"], job["seed"])
    write_mp4(Path(job["path"]), frames, job["fps"])
    return job["index"]


# --------------------------------------------------------------- annotations
def write_annotations(out: Path, videos: list[dict], sentences: list[dict], test_rows: list[dict]) -> None:
    with open(out / "MSRVTT_data.json", "w") as f:
        json.dump({"videos": videos, "sentences": sentences}, f)
    with open(out / "MSRVTT_train.9k.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["video_id"])
        writer.writerows([v["video_id"]] for v in videos if v["split"] == "train")
    with open(out / "MSRVTT_JSFUSION_test.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["key", "vid_key", "video_id", "sentence"])
        writer.writeheader()
        writer.writerows(test_rows)


@dataclass
class DemoConfig:
    """What the demo set holds; the metadata of a field is its `diffret demo-data` option."""

    # 2000 x 4 training captions: with 1000 the seeds' stage-one R@1 spread over 5.7 points (each run
    # memorises its own way); 3000 test videos keep the better-trained stage one inside 30-70% R@1
    # (docs/benchmarks.md, the demo as an instrument).
    n_train: int = field(default=2000, metadata={"flag": "--train", "help": "Training videos."})
    n_test: int = field(default=3000, metadata={"flag": "--test", "help": "Test videos (one caption each)."})
    seed: int = 0
    shifted: bool = field(default=False, metadata={"help": "Out-of-domain variant: unseen backgrounds, new phrasings."})
    size: int = 64  # frame side in pixels (even: yuv420p)
    fps: int = 8
    seconds: float = 3.0
    workers: int = 2  # rendering processes

    def __post_init__(self):
        check_numbers(self, {"n_train": ">=0", "n_test": ">=0", "seed": ">=0", "size": ">=2", "fps": ">=1",
                             "seconds": ">0", "workers": ">=0"})


def make_demo_dataset(out, progress: Callable[[int, int], None] | None = None, **settings) -> dict:
    """Write the synthetic dataset under ``out`` (``settings``: DemoConfig's fields) and return a
    summary dict (also saved as ``demo.json``)."""
    out, c = Path(out), DemoConfig(**settings)
    (out / "videos").mkdir(parents=True, exist_ok=True)
    if c.size % 2:
        raise ValueError("size must be even (yuv420p)")
    seed, shifted = int(c.seed), bool(c.shifted)
    n_frames = max(1, int(round(c.fps * c.seconds)))
    attr_rng, text_rng = np.random.default_rng([seed, 0]), np.random.default_rng([seed, 1 + shifted])
    words = WORDS[shifted]
    videos, sentences, test_rows, jobs = [], [], [], []
    for i in range(c.n_train + c.n_test):
        split, vid = ("train" if i < c.n_train else "test"), f"video{i}"
        attrs = sample_attributes(attr_rng)
        captions = paraphrases(attrs, TRAIN_CAPTIONS if split == "train" else 1, words, text_rng)
        videos.append({"video_id": vid, "id": i, "split": split, "category": 0, "attributes": attrs})
        for caption in captions:
            sentences.append({"video_id": vid, "caption": caption, "sen_id": len(sentences)})
        if split == "test":
            test_rows.append({"key": f"ret{len(test_rows)}", "vid_key": f"msr{i}", "video_id": vid,
                              "sentence": captions[0]})
        jobs.append({"index": i, "path": str(out / "videos" / f"{vid}.mp4"), "attrs": attrs, "size": c.size,
                     "frames": n_frames, "fps": c.fps, "shifted": shifted, "seed": [seed, 2, int(shifted), i]})
    write_annotations(out, videos, sentences, test_rows)

    # Always rendered in fresh processes: in a process that has imported open_clip (its imports
    # load other native libraries first), the same frames encode to other bytes.
    total = len(jobs)
    with mp.get_context("spawn").Pool(max(1, min(c.workers or 1, total))) as pool:
        for done, _ in enumerate(pool.imap_unordered(render_video, jobs, chunksize=8), 1):
            if progress:
                progress(done, total)

    summary = {"root": str(out), "train_videos": c.n_train, "test_videos": c.n_test, "captions": len(sentences),
               "seed": seed, "shifted": shifted}
    params = {"size": c.size, "fps": c.fps, "seconds": c.seconds, "frames": n_frames, "codec": "libx264",
              "pix_fmt": "yuv420p", "train_captions_per_video": TRAIN_CAPTIONS,
              "distinct_test_captions": len({r["sentence"] for r in test_rows}),
              "vocabulary": {"shapes": list(SHAPES), "colours": list(COLOURS), "sizes": list(SIZES),
                             "directions": list(DIRECTIONS), "events": list(EVENTS)}}
    with open(out / "demo.json", "w") as f:
        json.dump({**summary, "params": params}, f, indent=2)
    return summary
