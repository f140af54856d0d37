"""What this machine allows a decode step, measured in the bench's own run beside the figures it bounds.
Memory: a step reads every weight of the LLM once (the embedding table only a row). Compute: it multiplies
each sequence by those weights, 2 FLOPs per weight, at the rate ONNX Runtime's MatMul reaches at the
decoder's MLP shape. A step takes at least the longer of the two."""

from __future__ import annotations

import os
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

BUFFER_BYTES = 1 << 30  # far larger than any CPU cache
MATMUL_REPEATS = 4  # MatMul pairs per timed graph, so one run's overhead is a small part of it


@dataclass(frozen=True)
class DecodeBound:
    one_thread_gbps: float  # decimal GB/s
    all_threads_gbps: float  # os.sched_getaffinity threads reading their share at once, as ONNX Runtime's
    threads: int
    weight_bytes_per_token: int  # what a decode step reads
    decode_parameters: int  # what a decode step multiplies each sequence by
    gflops: dict[int, float]  # FP32 MatMul GFLOP/s by decode batch (ONNX Runtime, all threads, weights in cache)

    @property
    def read_s(self) -> float:
        return self.weight_bytes_per_token / (self.all_threads_gbps * 1e9)

    def compute_s(self, batch: float) -> float:
        """The FLOPs of a step of ``batch`` sequences at the rate measured for the nearest measured batch."""
        nearest = min(self.gflops, key=lambda b: abs(b - batch))
        return 2 * self.decode_parameters * batch / (self.gflops[nearest] * 1e9)

    def step_floor_s(self, batch: float) -> float:
        return max(self.read_s, self.compute_s(batch))

    @property
    def tokens_per_s(self) -> float:
        """The batch-1 decode ceiling: every core reading weights, nothing else."""
        return 1 / self.step_floor_s(1)


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


def matmul_gflops(batch: int, hidden: int, intermediate: int, threads: int, seconds: float = 0.5) -> float:
    """GFLOP/s of ONNX Runtime running [batch, hidden] through the MLP's two matrices, MATMUL_REPEATS times."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    up = numpy_helper.from_array(rng.standard_normal((hidden, intermediate), np.float32) * 0.02, "up")
    down = numpy_helper.from_array(rng.standard_normal((intermediate, hidden), np.float32) * 0.02, "down")
    nodes, x = [], "x"
    for i in range(MATMUL_REPEATS):
        nodes += [helper.make_node("MatMul", [x, "up"], [f"h{i}"]), helper.make_node("MatMul", [f"h{i}", "down"], [f"y{i}"])]
        x = f"y{i}"
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, hidden])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, [batch, hidden])], [up, down])
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    feed = {"x": rng.standard_normal((batch, hidden), np.float32)}
    session.run(None, feed)
    times = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(times) < 5:
        start = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - start)
    return 2 * MATMUL_REPEATS * 2 * hidden * intermediate * batch / statistics.median(times) / 1e9


def measure(weight_bytes_per_token: int, decode_parameters: int, hidden: int, intermediate: int,
            batches: tuple[int, ...]) -> DecodeBound:
    threads = len(os.sched_getaffinity(0))
    return DecodeBound(read_bandwidth(1), read_bandwidth(threads), threads, weight_bytes_per_token, decode_parameters,
                       {b: matmul_gflops(b, hidden, intermediate, threads) for b in sorted({1, *batches})})
