"""The decode bound: how fast this machine reads memory, and what that allows a batch-1 decode step,
which reads every weight of the LLM once (the embedding table only a row). Measured in the bench's
own run, beside the served figures it bounds."""

from __future__ import annotations

import os
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

BUFFER_BYTES = 1 << 30  # far larger than any CPU cache


@dataclass(frozen=True)
class DecodeBound:
    one_thread_gbps: float  # decimal GB/s
    all_threads_gbps: float  # os.sched_getaffinity threads reading their share at once, as ONNX Runtime's
    threads: int
    weight_bytes_per_token: int  # what a batch-1 decode step reads

    @property
    def tokens_per_s(self) -> float:
        """The batch-1 decode ceiling: every core reading weights, nothing else."""
        return self.all_threads_gbps * 1e9 / self.weight_bytes_per_token


def read_bandwidth(threads: int, repeats: int = 5) -> float:
    """Decimal GB/s that ``threads`` threads read together (numpy sums release the GIL): the median of ``repeats``."""
    data = np.ones(BUFFER_BYTES // 8, dtype=np.float64)
    shares = np.array_split(data, threads)
    times = []
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(np.sum, shares))  # warm: pages touched, threads started
        for _ in range(repeats):
            start = time.perf_counter()
            list(pool.map(np.sum, shares))
            times.append(time.perf_counter() - start)
    return data.nbytes / statistics.median(times) / 1e9


def measure(weight_bytes_per_token: int) -> DecodeBound:
    threads = len(os.sched_getaffinity(0))
    return DecodeBound(read_bandwidth(1), read_bandwidth(threads), threads, weight_bytes_per_token)
