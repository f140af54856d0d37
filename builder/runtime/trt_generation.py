"""The decode loop over the LLM's TensorRT plan, with the KV cache kept in device memory between steps.

Same contract as :class:`builder.runtime.generation.LanguageModelRunner` (same sampling through
``choose_token``, same stop rules), so the ``llm`` decode model streams the same way on both.
Per token only the new token's inputs go to the device and only its logits come back: every
layer's past/present lives in two device buffers of ``max_context`` positions that swap roles
each step (a plan cannot read and write one tensor in place).

The plan has two optimization profiles (see :mod:`builder.compile.profiles`): 0 for prefill (the
prompt, empty past), 1 for decode (one token); each has its own execution context.

Runs only on a GPU with ``tensorrt`` installed, inside the NGC container's Python backend. It
was written and type-checked without a GPU and has not run here; ``make gpu-smoke`` is its test
(greedy output ids equal to the PyTorch reference).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import tensorrt as trt
from polygraphy import cuda

from builder.compile.tensorrt_build import query_gpu
from builder.runtime.generation import SamplingParams, choose_token
from builder.runtime.model_facts import ModelFacts

PREFILL, DECODE = 0, 1


class TensorRTLanguageModelRunner:
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
        self.kv_inputs = [n for n in names if n.startswith("past_key_values.")]
        self.kv_outputs = [n.replace("past_key_values.", "present.", 1) for n in self.kv_inputs]
        kv_shape = (1, facts.num_kv_heads, max_context, facts.head_dim)
        # Two buffers per layer tensor: one holds the past, the other receives the present.
        self.kv = [[cuda.DeviceArray(kv_shape, self._dtype(name)) for _ in range(2)] for name in self.kv_inputs]
        # The other tensors, allocated once at their largest; DeviceArray.resize within that reuses the memory.
        largest = {"logits": facts.vocab_size, "multimodal_embeds": max_context * facts.hidden_size}
        self.small = {n: cuda.DeviceArray((largest.get(n, max_context),), self._dtype(n))
                      for n in names if not n.startswith(("past_key_values.", "present."))}

    @classmethod
    def for_this_gpu(cls, directory: Path, plans: str, facts: ModelFacts, max_context: int) -> "TensorRTLanguageModelRunner":
        """``plans`` is the config parameter ``"8.6=model_sm86.plan;8.9=model_sm89.plan"``."""
        by_capability = dict(item.split("=", 1) for item in plans.split(";"))
        gpu = query_gpu()
        if gpu is None or gpu[1] not in by_capability:
            found = "no GPU" if gpu is None else f"{gpu[0]} (compute capability {gpu[1]})"
            raise RuntimeError(f"no LLM plan for {found}; plans present: {', '.join(sorted(by_capability))}")
        return cls(Path(directory) / by_capability[gpu[1]], facts, max_context)

    def _dtype(self, name: str) -> np.dtype[Any]:
        return np.dtype(trt.nptype(self.engine.get_tensor_dtype(name)))

    def generate(
        self,
        input_ids: np.ndarray,  # [S] int64
        multimodal_embeds: np.ndarray,  # [S, hidden]
        multimodal_mask: np.ndarray,  # [S] bool
        params: SamplingParams,
        stop_ids: frozenset[int] = frozenset(),
    ) -> Iterator[int]:
        """Yields new token ids as they are chosen; stops on a stop id (not yielded) or max_tokens."""
        length = int(input_ids.size)  # the llm model has checked length + max_tokens <= max_context
        rng = np.random.default_rng(params.seed)
        hidden = self.facts.hidden_size
        step = {
            "input_ids": input_ids[None],
            "multimodal_embeds": multimodal_embeds[None],
            "multimodal_mask": multimodal_mask[None],
            "position_ids": np.arange(length, dtype=np.int64)[None],
        }
        past, current = 0, 0  # past length; which of the two KV buffers holds it
        for _ in range(params.max_tokens):
            profile = PREFILL if past == 0 else DECODE
            step["attention_mask"] = np.ones((1, past + step["input_ids"].shape[1]), dtype=np.int64)
            logits = self._run(self.contexts[profile], step, past, current)
            token = choose_token(logits, params, rng)
            if token in stop_ids:
                return
            yield token
            past, current = past + step["input_ids"].shape[1], 1 - current
            step = {
                "input_ids": np.array([[token]], dtype=np.int64),
                "multimodal_embeds": np.zeros((1, 1, hidden), dtype=np.float32),
                "multimodal_mask": np.zeros((1, 1), dtype=bool),
                "position_ids": np.array([[past]], dtype=np.int64),
            }

    def _run(self, context: trt.IExecutionContext, host: dict[str, np.ndarray], past: int, current: int) -> np.ndarray:
        facts = self.facts
        for name, array in host.items():
            buffer = self.small[name]
            array = np.ascontiguousarray(array, dtype=buffer.dtype)
            buffer.resize(array.shape)
            buffer.copy_from(array, self.stream)
            context.set_input_shape(name, array.shape)
            context.set_tensor_address(name, buffer.ptr)
        for (name, out_name), pair in zip(zip(self.kv_inputs, self.kv_outputs), self.kv):
            context.set_input_shape(name, (1, facts.num_kv_heads, past, facts.head_dim))
            context.set_tensor_address(name, pair[current].ptr)
            context.set_tensor_address(out_name, pair[1 - current].ptr)
        logits = self.small["logits"]
        logits.resize((1, facts.vocab_size))
        context.set_tensor_address("logits", logits.ptr)
        if not context.execute_async_v3(self.stream.ptr):
            raise RuntimeError("TensorRT execution failed")
        host_logits = np.empty((1, facts.vocab_size), dtype=logits.dtype)
        logits.copy_to(host_logits, self.stream)
        self.stream.synchronize()
        return host_logits[0]
