"""The client contract, once: the ensembles' inputs and outputs (the names Triton's LLM ensembles use).

Read by the repository planner (ensemble and model configs), the models that read each input, the
gRPC client and the CLI's ``ask``. Serving code: it lives in the runtime copied into the repository.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

_NUMPY = {"TYPE_STRING": np.object_, "TYPE_BOOL": np.bool_, "TYPE_INT32": np.int32, "TYPE_INT64": np.int64,
          "TYPE_UINT64": np.uint64, "TYPE_FP32": np.float32}


@dataclass(frozen=True)
class Tensor:
    name: str
    data_type: str  # Triton's name: TYPE_FP32, TYPE_STRING...
    dims: tuple[int, ...]
    optional: bool = False
    help: str = ""  # what a client sends in it (the CLI's help)
    ragged: bool = False  # allow_ragged_batch: requests of different shapes share a dynamic batch

    @property
    def numpy_dtype(self) -> type[np.generic]:
        return _NUMPY[self.data_type]

    @property
    def scalar_type(self) -> type:
        """The Python type of one value: what a client passes and a model reads."""
        return {np.object_: str, np.bool_: bool, np.float32: float}.get(self.numpy_dtype, int)


# Required, but declared optional: Triton 2.51 answers a request without it only with "unexpected
# deadlock" in the ensemble; `preprocess` sees None and says "text_input: required input is missing".
TEXT_INPUT = Tensor("text_input", "TYPE_STRING", (1,), optional=True, help="the user's message (UTF-8)")
# The request's media and system prompt, read by `preprocess`.
IMAGE_INPUT = Tensor("image", "TYPE_STRING", (-1,), optional=True, help="0..N PNG/JPEG files")
AUDIO_INPUT = Tensor("audio", "TYPE_STRING", (-1,), optional=True, help="0..N WAV files")
SYSTEM_PROMPT_INPUT = Tensor("system_prompt", "TYPE_STRING", (1,), optional=True,
                             help="replaces the chat template's default system prompt")
# The whole conversation instead of text_input (+ system_prompt): JSON as runtime.chat.parse_conversation reads it.
MESSAGES_INPUT = Tensor("messages", "TYPE_STRING", (1,), optional=True,
                        help='the conversation as JSON, instead of text_input: [{"role": "system" | "user" | "assistant", '
                             '"content": "..." or [{"type": "text", "text": "..."}, {"type": "image" | "audio", "index": n}]}]')
MEDIA_INPUTS = (IMAGE_INPUT, AUDIO_INPUT, SYSTEM_PROMPT_INPUT, MESSAGES_INPUT)
# Read by the decode model into runtime.generation.SamplingParams (a field of the same name each).
SAMPLING_INPUTS = (
    Tensor("max_tokens", "TYPE_INT32", (1,), optional=True, help="new tokens at most (default: the build's)"),
    Tensor("temperature", "TYPE_FP32", (1,), optional=True, help="0 (default): greedy"),
    Tensor("top_k", "TYPE_INT32", (1,), optional=True, help="sample from the k likeliest tokens (0: all)"),
    Tensor("top_p", "TYPE_FP32", (1,), optional=True, help="sample from the smallest set of this probability"),
    Tensor("seed", "TYPE_UINT64", (1,), optional=True, help="random seed of a sampled answer"),
)
STREAM_INPUT = Tensor("stream", "TYPE_BOOL", (1,), optional=True, help="one response per chunk of tokens")  # ensemble_stream
CLIENT_INPUTS = (TEXT_INPUT, *MEDIA_INPUTS, *SAMPLING_INPUTS)
TEXT_OUTPUT = Tensor("text_output", "TYPE_STRING", (-1,))
OUTPUT_IDS = Tensor("output_ids", "TYPE_INT64", (-1,))
ANSWER_OUTPUTS = (TEXT_OUTPUT, OUTPUT_IDS)
# The prompt's length in tokens as the LLM reads it (chat template, images and audio expanded): a client's usage figure.
PROMPT_TOKENS_OUTPUT = Tensor("prompt_tokens", "TYPE_INT32", (1,))
CLIENT_OUTPUTS = (*ANSWER_OUTPUTS, PROMPT_TOKENS_OUTPUT)  # the ensembles' (on ensemble_stream: in every response with tokens)

UNARY_ENSEMBLE = "ensemble"
STREAMING_ENSEMBLE = "ensemble_stream"
# The model holding the LLM: its config's parameters hold the build's limits (``default_max_tokens``, ``max_tokens``),
# which a client reads to tell an answer cut at max_tokens from one that ended at a stop token.
DECODE_MODEL = "llm"

# The pipeline's own tensors, between the repository's models and in the graphs' signatures, never a client's:
# preprocess -> vision_encoder / audio_encoder -> fuse -> llm. Shapes that depend on the model are the plan's.
INPUT_IDS = "input_ids"
PROMPT_POSITIONS = "prompt_positions"  # [3, S] M-RoPE positions, for a decoder that takes them
PIXEL_VALUES = "pixel_values"
IMAGE_SIZES = "image_sizes"
INPUT_FEATURES = "input_features"
FEATURE_ATTENTION_MASK = "feature_attention_mask"  # an audio graph that masks each clip's padding
AUDIO_FRAMES = "audio_frames"
IMAGE_EMBEDS = "image_embeds"
AUDIO_EMBEDS = "audio_embeds"
MULTIMODAL_EMBEDS = "multimodal_embeds"
MULTIMODAL_MASK = "multimodal_mask"
# Between the entry points and `llm` only (runtime.sessions): which session a call opens, polls or cancels (its
# client went away), and whether a poll's chunk ends the answer.
SESSION_INPUT = Tensor("session", "TYPE_UINT64", (1,), optional=True)
CANCEL_INPUT = Tensor("cancel", "TYPE_BOOL", (1,), optional=True)
FINISHED_OUTPUT = Tensor("finished", "TYPE_BOOL", (1,))
# The LLM graph's own (builder.export.recipes.llm_recipe): one graph for prefill and decode, the KV cache as
# ``past_key_values.{layer}.key/value`` in and ``present.{layer}.key/value`` out.
ATTENTION_MASK = "attention_mask"
POSITION_IDS = "position_ids"
LOGITS = "logits"
PAST_PREFIX = "past_key_values"
PRESENT_PREFIX = "present"
# An LLM graph whose attention updates the KV cache in place (builder.compile.ort_llm_graph) says so in its metadata:
# its past and present are one buffer per layer of a fixed capacity, and its attention mask is right-padded.
KV_LAYOUT_KEY = "kv_cache"
KV_IN_PLACE = "in_place"
