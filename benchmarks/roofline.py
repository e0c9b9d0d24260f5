"""The roofline of stage two: this machine's measured peaks, and each benchmark figure's work.

`probe(device)` times, in the calling run, a float32 matrix product (2048^3, best of 5: the
matmul peak, GFLOP/s) and a large copy (256 MiB each way, best of 5: the memory bandwidth, GB/s
read + written), on one thread and on all of torch's threads (CPU) or on the GPU.

The work models count, from the algebra in generator/denoiser.py, the floating-point operations
(a multiply-add is 2) and the bytes that must move through memory (float32 tensors too large for
the caches, each pass counted once), so a measured time gives the fraction of either peak reached:

    fraction = flops / (seconds x peak)   and   bytes / (seconds x bandwidth)

A figure near the bandwidth roof is memory-bound (fewer passes would move it); near neither, it
is bound by per-op overhead (fewer, larger ops, or fused kernels would move it).
"""
from __future__ import annotations

import time

import torch

F32 = 4


def _best(fn, sync, reps: int = 5) -> float:
    fn()
    sync()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best


def probe(device="cpu", n: int = 2048, copy_mib: int = 256) -> dict:
    """Measured matmul GFLOP/s and copy GB/s (read + write) on `device`; CPU: 1 thread and all."""
    device = torch.device(device)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    x = torch.empty(copy_mib << 18, device=device).normal_()
    y = torch.empty_like(x)
    out = {}
    threads = [1, torch.get_num_threads()] if device.type == "cpu" else [None]
    for th in dict.fromkeys(threads):
        before = torch.get_num_threads()
        if th:
            torch.set_num_threads(th)
        try:
            mm = _best(lambda: a @ b, sync)
            cp = _best(lambda: y.copy_(x), sync)
        finally:
            torch.set_num_threads(before)
        key = f"{th}_thread" if th else "gpu"
        out[key] = {"matmul_gflops": round(2 * n**3 / mm / 1e9, 1),
                    "copy_gbps": round(2 * x.numel() * F32 / cp / 1e9, 1)}
    return out


def fraction(flops: float, nbytes: float, seconds: float, peak: dict) -> dict:
    """Share of the matmul peak and of the copy bandwidth reached by `seconds` of that work."""
    return {"gflop": round(flops / 1e9, 2), "gbyte": round(nbytes / 1e9, 3),
            "of_matmul_peak": round(flops / seconds / (peak["matmul_gflops"] * 1e9), 3),
            "of_bandwidth": round(nbytes / seconds / (peak["copy_gbps"] * 1e9), 3)}


def train_step_work(B: int, K: int, U: int, F: int, L: int, D: int, legacy: bool = False) -> dict:
    """FLOPs and bytes of one stage-two training step (both denoisers, forward + backward; backward
    ~2x the forward for the products with a weight-gradient, 1x where the input has no gradient).

    New (factored): the t2v first layer on U F frames ([U F, D] x [D, 2D]) and pooled as projections
    (B U F 2D); the [B, U, 2D] add-ReLU-dot forward and backward (AddReluDot: dec written once and read
    twice, its gradient written once and read by two products). Legacy: the first layer on every
    pair's pooled video (B K D 2D) and q_proj on every pooled v2t candidate (B K D^2)."""
    E = 2 * D
    wti = 2 * B * L * B * F * D  # stage-1 candidates (no grad): every caption's words x every video's frames
    att = 2 * B * U * F * D  # one attention (scores) or pooling product, forward
    head = 2 * B * (2 * D * D + E * D)  # the unfolded head chain, forward
    ard = 3 * B * K * E  # add, max, multiply-add a [B, K, 2D] element, forward
    if legacy:
        t2v = 3 * (2 * B * K * D * E) + 2 * 2 * att + 3 * head + 3 * ard
        v2t = 3 * (2 * B * K * D * D) + 3 * (2 * U * D * (D + E)) + 2 * 2 * att + 3 * head + 3 * ard
        big = (6 * B * K * E + 6 * B * K * D) * F32 * 2  # dec and pooled tensors of both directions, ~6 passes
    else:
        t2v = 2 * (2 * U * F * D * E) + 3 * (2 * B * U * F * E) + 2 * 2 * att + 3 * head + 3 * ard
        v2t = 3 * (2 * U * D * (2 * D + E)) + 2 * 2 * att + 3 * head + 3 * ard
        big = 6 * B * U * E * F32 + 8 * B * U * D * F32  # t2v's dec and its gradient; v2t's pooled u
    return {"flops": float(wti + t2v + v2t), "bytes": float(big)}


def generation_work(nq: int, k: int, nc: int, F: int, D: int, steps: int, direction: str, fused: bool = False) -> dict:
    """FLOPs and bytes of sampling `steps` DDIM steps for nq queries over k candidates each (k = nc:
    the whole gallery), one direction. Per step and (query, candidate): the pooled head input
    (2D multiply-adds), add-ReLU-dot (3 x 2D); the step's [nq, k, 2D] tables read once or twice
    (eager: add into a scratch buffer, relu in place, a product reading it: 4 passes; fused: 2)."""
    E = 2 * D
    pairs = nq * k
    if direction == "t2v":
        if k == nc:  # dense: frames projected once, attention and pooling over every video
            prep = 2 * nc * F * D * E + 2 * pairs * F * (2 * D + E)
        else:  # per pair: the pooled video through the first layer and through the head
            prep = 2 * pairs * F * 2 * D + 2 * pairs * D * 2 * E
    else:  # texts through the first layer, key and head once; attention and pooling per pair
        prep = 2 * nc * D * (2 * E + D) + 2 * pairs * F * 2 * D
    vm = k <= 2 * steps
    per_step = pairs * (2 * E + 3 * E) if vm else pairs * (2 * D + 3 * E) + 2 * nq * D * E
    passes = 2 if fused else 4
    step_bytes = pairs * E * F32 * (passes + (1 if vm else 0.5))
    return {"flops": float(prep + steps * per_step), "bytes": float(steps * step_bytes)}


if __name__ == "__main__":
    import json
    import sys

    print(json.dumps(probe(sys.argv[1] if len(sys.argv) > 1 else "cpu"), indent=1))
