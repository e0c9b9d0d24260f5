"""Independent blocks of work on single-threaded worker threads (the CPU hot loops' scheduler).

Used by the blocked WTI gallery (wti.py) and the diffusion re-ranking (generator/rerank.py).
"""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import torch


def run_blocks(fn, tasks: list, device="cpu", workers: int | None = None) -> None:
    """fn(task) for every task; on the CPU spread over `workers` Python threads (default: torch's
    thread count) whose torch ops run single-threaded, pulling tasks as they finish.

    Independent blocks on independent threads never wait for each other, while one op split over
    OpenMP threads ends at a barrier: on a CPU shared with other jobs, a descheduled partner makes
    every barrier wait a time slice (measured 5-10x slower at load 6 on 2 cores). Results do not
    depend on the split. torch's thread setting is restored afterwards.
    """
    n = torch.get_num_threads() if workers is None else workers
    if torch.device(device).type != "cpu" or n <= 1 or len(tasks) <= 1:
        for t in tasks:
            fn(t)
        return
    pending, lock = iter(tasks), threading.Lock()
    grad, inference = torch.is_grad_enabled(), torch.is_inference_mode_enabled()

    def worker():
        torch.set_num_threads(1)
        with torch.inference_mode(inference), torch.set_grad_enabled(grad):
            while True:
                with lock:
                    t = next(pending, None)
                if t is None:
                    return
                fn(t)

    try:
        with ThreadPoolExecutor(n) as pool:
            for f in [pool.submit(worker) for _ in range(min(n, len(tasks)))]:
                f.result()
    finally:
        torch.set_num_threads(n)
