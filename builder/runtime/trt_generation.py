"""The LLM's TensorRT plan behind the ``start``/``decode`` contract of ``LanguageModelRunner``, so the
decode scheduler batches, samples and streams the same way on both targets. The KV cache stays on the
device: one buffer per sequence, and past/present batch buffers that swap roles in a steady batch;
two optimization profiles (prefill, decode), each with its own context.
NOT RUN ON A GPU here: ``make gpu-smoke`` is its test (see README, "Verified on CPU only").
"""

from __future__ import annotations

import weakref
from ctypes import c_size_t, c_void_p
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tensorrt as trt
from polygraphy import cuda

from .contract import (
    ATTENTION_MASK,
    INPUT_IDS,
    LOGITS,
    MULTIMODAL_EMBEDS,
    MULTIMODAL_MASK,
    PAST_PREFIX,
    POSITION_IDS,
    PRESENT_PREFIX,
)
from .generation import GenerateOne, SamplingParams, Sequence
from .gpu import query_gpu
from .model_facts import ModelFacts

PREFILL, DECODE = 0, 1


@dataclass(frozen=True)
class DeviceCache:
    """One sequence's KV cache: ``[kv tensors, kv_heads, capacity, head_dim]`` in ``buffer`` (raw bytes)."""

    buffer: cuda.DeviceArray
    capacity: int  # positions per head


class TensorRTLanguageModelRunner(GenerateOne):
    def __init__(self, plan_path: Path, facts: ModelFacts, max_context: int) -> None:
        self.facts, self.max_context = facts, max_context
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = runtime.deserialize_cuda_engine(plan_path.read_bytes())
        if self.engine is None:
            raise RuntimeError(f"{plan_path}: TensorRT could not load the plan (built with another version or GPU?)")
        self.stream = cuda.Stream()
        self.contexts = [self.engine.create_execution_context() for _ in (PREFILL, DECODE)]
        self.contexts[DECODE].set_optimization_profile_async(DECODE, self.stream.ptr)
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.dtypes = {n: np.dtype(trt.nptype(self.engine.get_tensor_dtype(n))) for n in names}
        self.kv_inputs = [n for n in names if n.startswith(f"{PAST_PREFIX}.")]
        self.kv_outputs = [n.replace(f"{PAST_PREFIX}.", f"{PRESENT_PREFIX}.", 1) for n in self.kv_inputs]
        kv_dtypes = {self.dtypes[n] for n in (*self.kv_inputs, *self.kv_outputs)}
        if len(kv_dtypes) != 1:
            raise RuntimeError(f"{plan_path}: KV tensors of several types {sorted(map(str, kv_dtypes))}; expected one")
        self.position_bytes = facts.head_dim * kv_dtypes.pop().itemsize  # one position of one head
        max_batch = self.engine.get_tensor_profile_shape(self.kv_inputs[0], DECODE)[2][0]
        self.kv_limit = len(self.kv_inputs) * self._kv_bytes(max_batch, max_context)  # largest batch buffer
        # The other tensors; DeviceArray.resize reallocates only when one grows.
        self.small = {n: cuda.DeviceArray((1,), self.dtypes[n]) for n in names if n not in (*self.kv_inputs, *self.kv_outputs)}
        self.past, self.present = cuda.DeviceArray.raw((1,)), cuda.DeviceArray.raw((1,))
        self.resident: list[Sequence] = []  # the sequences whose caches `past` holds as the last step left them

    @classmethod
    def for_this_gpu(cls, directory: Path, plans: str, facts: ModelFacts, max_context: int) -> "TensorRTLanguageModelRunner":
        """``plans`` is the config parameter ``"8.6=model_sm86.plan;8.9=model_sm89.plan"``."""
        by_capability = dict(item.split("=", 1) for item in plans.split(";"))
        gpu = query_gpu()
        if gpu is None or gpu[1] not in by_capability:
            found = "no GPU" if gpu is None else f"{gpu[0]} (compute capability {gpu[1]})"
            raise RuntimeError(f"no LLM plan for {found}; plans present: {', '.join(sorted(by_capability))}")
        return cls(Path(directory) / by_capability[gpu[1]], facts, max_context)

    def start(
        self,
        input_ids: np.ndarray,  # [S] int64
        multimodal_embeds: np.ndarray,  # [S, hidden]
        multimodal_mask: np.ndarray,  # [S] bool
        params: SamplingParams,
        stop_ids: frozenset[int] = frozenset(),
        position_ids: np.ndarray | None = None,  # unused: plain positions only (the build refuses M-RoPE models here)
    ) -> Sequence:
        length = int(input_ids.size)  # the llm model has checked length + max_tokens <= max_context
        logits = self._run(PREFILL, {
            INPUT_IDS: input_ids[None],
            MULTIMODAL_EMBEDS: multimodal_embeds[None],
            MULTIMODAL_MASK: multimodal_mask[None],
            ATTENTION_MASK: np.ones((1, length), dtype=np.int64),
            POSITION_IDS: np.arange(length, dtype=np.int64)[None],
        }, past_length=0)
        capacity = length + params.max_tokens
        cache = DeviceCache(cuda.DeviceArray.raw((len(self.kv_inputs) * self._kv_bytes(1, capacity),)), capacity)
        present = self._kv_bytes(1, length)
        for index in range(len(self.kv_inputs)):
            self._copy_heads(self._at(cache, index, 0), capacity, self.present.ptr + index * present, length, length)
        self.stream.synchronize()
        seq = Sequence(params, stop_ids, np.random.default_rng(params.seed), cache, length, logits[0].astype(np.float32))
        weakref.finalize(seq, cache.buffer.free).atexit = False  # DeviceArray has no __del__
        return seq

    def retire(self, sequence: Sequence) -> None:
        """Nothing kept: this runner has no prefix cache yet (its device memory goes with the sequence)."""

    def decode(self, sequences: list[Sequence]) -> None:
        """Feeds each sequence its last token in one batched step; see the module docstring for the cache."""
        batch, longest = len(sequences), max(s.length for s in sequences)
        for seq in sequences:
            if seq.length >= seq.past.capacity:
                raise RuntimeError(f"a sequence decoded past its max_tokens ({seq.params.max_tokens})")
        resident, self.resident = self.resident, []  # until this step has succeeded
        if sequences != resident:  # identity: Sequence compares by identity
            self._gather(sequences, longest)
        attention = np.zeros((batch, longest + 1), dtype=np.int64)
        for row, seq in enumerate(sequences):
            attention[row, longest - seq.length:] = 1
        logits = self._run(DECODE, {
            INPUT_IDS: np.array([[s.tokens[-1]] for s in sequences], dtype=np.int64),
            MULTIMODAL_EMBEDS: np.zeros((batch, 1, self.facts.hidden_size), dtype=np.float32),
            MULTIMODAL_MASK: np.zeros((batch, 1), dtype=bool),
            ATTENTION_MASK: attention,
            POSITION_IDS: np.array([[s.length] for s in sequences], dtype=np.int64),
        }, past_length=longest)
        present, heads = self._kv_bytes(batch, longest + 1), self.facts.num_kv_heads
        for row, seq in enumerate(sequences):  # append the new position (index `longest` of present) to each cache
            for index in range(len(self.kv_inputs)):
                new = self.present.ptr + index * present + (row * heads * (longest + 1) + longest) * self.position_bytes
                self._copy_heads(self._at(seq.past, index, seq.length), seq.past.capacity, new, longest + 1, 1)
        self.stream.synchronize()
        self.past, self.present = self.present, self.past
        self.resident = list(sequences)
        for row, seq in enumerate(sequences):
            seq.length += 1
            seq.logits = logits[row].astype(np.float32)

    def _gather(self, sequences: list[Sequence], longest: int) -> None:
        """The sequences' caches into ``past`` as one left-padded batch."""
        past = self._kv_bytes(len(sequences), longest)
        self._reserve(self.past, past * len(self.kv_inputs))
        if any(s.length < longest for s in sequences):  # padding is masked out, but must not hold NaN
            cudart = cuda.wrapper()
            cudart.check(cudart.handle.cudaMemsetAsync(
                c_void_p(self.past.ptr), 0, c_size_t(past * len(self.kv_inputs)), c_void_p(self.stream.ptr)))
        for row, seq in enumerate(sequences):
            for index in range(len(self.kv_inputs)):
                padded = self.past.ptr + index * past + (row * self.facts.num_kv_heads * longest + longest - seq.length) * self.position_bytes
                self._copy_heads(padded, longest, self._at(seq.past, index, 0), seq.past.capacity, seq.length)

    def _run(self, profile: int, host: dict[str, np.ndarray], past_length: int) -> np.ndarray:
        """One plan execution: past from ``self.past``, present into ``self.present``. Returns the host
        array the logits [batch, vocab] are being copied into: valid once the caller synchronizes."""
        context, facts = self.contexts[profile], self.facts
        batch, new = host[INPUT_IDS].shape
        for name, array in host.items():
            buffer = self.small[name]
            array = np.ascontiguousarray(array, dtype=self.dtypes[name])
            buffer.resize(array.shape)
            buffer.copy_from(array, self.stream)
            self._bind(context, name, buffer.ptr, array.shape)
        past, present = self._kv_bytes(batch, past_length), self._kv_bytes(batch, past_length + new)
        self._reserve(self.present, present * len(self.kv_inputs))
        for index, (name, out_name) in enumerate(zip(self.kv_inputs, self.kv_outputs)):
            self._bind(context, name, self.past.ptr + index * past, (batch, facts.num_kv_heads, past_length, facts.head_dim))
            context.set_tensor_address(out_name, self.present.ptr + index * present)
        logits = self.small[LOGITS].resize((batch, facts.vocab_size))
        context.set_tensor_address(LOGITS, logits.ptr)
        if not context.execute_async_v3(self.stream.ptr):
            raise RuntimeError("TensorRT execution failed")
        host_logits = np.empty((batch, facts.vocab_size), dtype=self.dtypes[LOGITS])
        logits.copy_to(host_logits, self.stream)
        return host_logits

    @staticmethod
    def _bind(context: Any, name: str, address: int, shape: tuple[int, ...]) -> None:
        if not context.set_input_shape(name, shape):
            raise RuntimeError(f"{name}: shape {shape} is outside the plan's optimization profile")
        context.set_tensor_address(name, address)

    def _kv_bytes(self, batch: int, positions: int) -> int:
        """Bytes of one KV tensor [batch, kv_heads, positions, head_dim]."""
        return batch * self.facts.num_kv_heads * positions * self.position_bytes

    def _at(self, cache: DeviceCache, index: int, position: int) -> int:
        """Address of KV tensor ``index``, head 0, ``position`` in a sequence's cache."""
        return cache.buffer.ptr + (index * self.facts.num_kv_heads * cache.capacity + position) * self.position_bytes

    def _reserve(self, array: cuda.DeviceArray, nbytes: int) -> None:
        """Grows a batch buffer (contents lost) to at least ``nbytes``: doubling, up to the decode profile's largest."""
        if nbytes > array.allocated_nbytes:
            array.resize((max(nbytes, min(2 * array.allocated_nbytes, self.kv_limit)),))

    def _copy_heads(self, dst: int, dst_positions: int, src: int, src_positions: int, count: int) -> None:
        """Copies ``count`` positions of every KV head between two [kv_heads, positions, head_dim] layouts."""
        cudart, row = cuda.wrapper(), self.position_bytes
        cudart.check(cudart.handle.cudaMemcpy2DAsync(
            c_void_p(dst), c_size_t(dst_positions * row), c_void_p(src), c_size_t(src_positions * row),
            c_size_t(count * row), c_size_t(self.facts.num_kv_heads), cuda.MemcpyKind.DeviceToDevice,
            c_void_p(self.stream.ptr),
        ))
