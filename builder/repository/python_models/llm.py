"""Triton model `llm`: continuous-batched decoding over the LLM graph; the only model holding its weights.

`execute` validates each request and hands it to the decode scheduler, then returns at once (the
answer goes through the request's response sender), so requests arriving while others decode join
the running batch at the next step. A request without `session` gets one response with the whole
answer (a client of `llm` alone, e.g. perf_analyzer on the decode model). The entry points `ensemble`
and `ensemble_stream` open a session with the prompt and poll it (see mmtb_runtime.sessions): each
response carries the tokens since the last; a call with `cancel` set stops the session's sequence
(its client went away).
"""

import numpy as np
import triton_python_backend_utils as pb_utils
from mmtb_runtime.contract import (
    CANCEL_INPUT,
    FINISHED_OUTPUT,
    INPUT_IDS,
    MULTIMODAL_EMBEDS,
    MULTIMODAL_MASK,
    PROMPT_POSITIONS,
    SESSION_INPUT,
)
from mmtb_runtime.errors import RequestError
from mmtb_runtime.generation import LanguageModelRunner
from mmtb_runtime.model_facts import ModelFacts
from mmtb_runtime.prefix_cache import PrefixCache
from mmtb_runtime.scheduler import DecodeJob, DecodeScheduler, KvBudget
from mmtb_runtime.sessions import SessionTable
from mmtb_runtime.text import TextStream, load_tokenizer
from mmtb_runtime.triton_io import (
    ModelArgs,
    answer_outputs,
    error_response,
    input_array,
    input_scalar,
    output_tensors,
    read_sampling_params,
)
from mmtb_runtime.triton_metrics import MetricsPublisher

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


class TritonPythonModel:
    def initialize(self, args):
        self.args = ModelArgs(args)
        self.facts = ModelFacts.load(self.args.file("model_facts.json"))
        self.tokenizer = load_tokenizer(self.args.file("tokenizer.json"))
        self.max_context = self.args.int("max_context")
        prefix_cache = None
        if self.args.parameters.get("runner") == "tensorrt":  # target tensorrt: one plan per GPU architecture
            from mmtb_runtime.trt_generation import TensorRTLanguageModelRunner

            runner = TensorRTLanguageModelRunner.for_this_gpu(
                self.args.directory, self.args.parameters["plans"], self.facts, self.max_context)
        else:
            cache_bytes = self.args.int("prefix_cache_bytes")
            prefix_cache = PrefixCache(cache_bytes) if cache_bytes else None
            runner = LanguageModelRunner(self.args.file("model.onnx"), self.facts, prefix_cache=prefix_cache,
                                         max_context=self.max_context, max_batch=self.args.int("max_decode_batch"))
        budget = KvBudget(self.args.int("kv_budget_tokens"), float(self.args.parameters["kv_queue_timeout_s"]))
        self.scheduler = DecodeScheduler(runner, max_batch=self.args.int("max_decode_batch"), budget=budget)
        self.metrics = MetricsPublisher(self.scheduler, prefix_cache, self.args.name)
        self.stop_ids = frozenset(self.facts.stop_ids)
        self.sessions = SessionTable(self.tokenizer, self.args.int("stream_interval_ms") / 1000)

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            try:
                self.handle(request, sender)
            except Exception as exc:  # noqa: BLE001 - rejected before its first token: a clean error response
                sender.send(error_response(exc, self.args.name), flags=FINAL)
        return None

    def handle(self, request, sender):
        session_id = input_scalar(request, SESSION_INPUT.name, None, int)
        if session_id is None:  # unary: the whole answer in one response
            self.start(self.prompt(request), WholeAnswer(sender, self.tokenizer, self.args.name))
            return
        if input_scalar(request, CANCEL_INPUT.name, False, bool):
            self.sessions.cancel(session_id)
            sender.send(answer("", [], finished=True), flags=FINAL)
            return
        prompt = self.prompt(request) if input_array(request, INPUT_IDS) is not None else None
        session = self.sessions.open(session_id) if prompt is not None else self.sessions.get(session_id)
        # Polled before it starts: the first token gets a response of its own.
        session.poll(lambda chunk: send_chunk(sender, chunk, self.args.name))
        if prompt is not None:
            try:
                self.start(prompt, session, is_cancelled=lambda: session.cancelled)
            except Exception as exc:  # noqa: BLE001 - refused at once: the poll above answers with it
                session.fail(exc)

    def start(self, prompt, sink, is_cancelled=lambda: False):
        """Decodes ``prompt``; ``sink`` gets each token, then ``finish()`` or ``fail(error)``, unless
        ``is_cancelled()`` turns true first: then the sequence stops silently at the next step."""
        ids, embeds, mask, params, positions = prompt
        self.scheduler.submit(DecodeJob(ids, embeds, mask, params, self.stop_ids, on_token=sink.token, on_finish=sink.finish,
                                        on_error=sink.fail, position_ids=positions, is_cancelled=is_cancelled))

    def prompt(self, request):
        """The request's prompt and sampling parameters, validated: a bad request fails before it starts."""
        a = self.args
        params = read_sampling_params(request, a.int("default_max_tokens"), a.int("max_tokens"))
        ids = input_array(request, INPUT_IDS)
        embeds, mask = input_array(request, MULTIMODAL_EMBEDS), input_array(request, MULTIMODAL_MASK)
        if ids is None or embeds is None or mask is None:
            raise RequestError("input_ids, multimodal_embeds and multimodal_mask are required to start an answer")
        if ids.size + params.max_tokens > self.max_context:
            raise RequestError(
                f"max_tokens: prompt ({ids.size} tokens) + max_tokens ({params.max_tokens}) exceeds the context of {self.max_context}"
            )
        positions = input_array(request, PROMPT_POSITIONS)  # M-RoPE models only: [3, S] from preprocess
        if self.facts.position_rows != 1 and (positions is None or positions.shape != (self.facts.position_rows, ids.size)):
            raise RequestError(f"prompt_positions: {self.facts.position_rows} rows of {ids.size} positions are required")
        return ids, embeds, mask, params, positions

    def finalize(self):
        self.metrics.close()
        self.scheduler.close()
        self.sessions.fail_all(RuntimeError("the model is unloading"))


class WholeAnswer:
    def __init__(self, sender, tokenizer, model):
        self.sender, self.model = sender, model
        self.text = TextStream(tokenizer)
        self.tokens = []

    def token(self, token):
        self.tokens.append(token)
        self.text.push(token)

    def finish(self):
        self.text.flush()
        self.sender.send(answer(self.text.sent, self.tokens, finished=True), flags=FINAL)

    def fail(self, exc):
        self.sender.send(error_response(exc, self.model), flags=FINAL)


def send_chunk(sender, chunk, model):
    if chunk.error is not None:
        sender.send(error_response(chunk.error, model), flags=FINAL)
    else:
        sender.send(answer(chunk.text, chunk.tokens, chunk.finished), flags=FINAL)


def answer(text, tokens, finished):
    return pb_utils.InferenceResponse(output_tensors=output_tensors({**answer_outputs(text, tokens), FINISHED_OUTPUT.name: np.array([finished])}))
