"""Triton models `ensemble` (unary) and `ensemble_stream` (decoupled): the entry points, holding no weights.

Both run the pipeline's steps themselves, with plain BLS calls (`steps.json`, written by the build and
checked like an ensemble's wiring): preprocess, the encoders, fuse, then the last step as a session on
`llm` (the model with the weights) that they poll until the answer ends, sending a response per chunk of
tokens when `stream` is set (only `ensemble_stream` takes it), else one with the whole answer (see
mmtb_runtime.sessions for why not decoupled BLS). Python models rather than Triton ensembles because
Triton 2.51 does not pass a client's cancellation (nor a gRPC client's deadline) on to an ensemble step
that is already running: here `request.is_cancelled()` is this model's own request, asked between polls,
and a client that went away has its sequence cancelled on `llm`. `execute` blocks for the request it
serves: instances, not threads, give concurrency (`count` in config.pbtxt).
"""

import json
import secrets

import numpy as np
import triton_python_backend_utils as pb_utils
from mmtb_runtime.contract import (
    CANCEL_INPUT,
    FINISHED_OUTPUT,
    OUTPUT_IDS,
    PROMPT_TOKENS_OUTPUT,
    SESSION_INPUT,
    STREAM_INPUT,
    TEXT_OUTPUT,
)
from mmtb_runtime.triton_io import ModelArgs, answer_outputs, error_response, forwarded_error, input_scalar, output_tensors

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
CHUNK = [TEXT_OUTPUT.name, OUTPUT_IDS.name, FINISHED_OUTPUT.name]


class StepFailed(Exception):
    """A step answered with an error: forwarded to the client as it is (its model counted it)."""


class TritonPythonModel:
    def initialize(self, args):
        self.args = ModelArgs(args)
        with open(self.args.file("steps.json")) as steps:
            *self.front, self.decode = json.load(steps)

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            try:
                self.serve(request, sender)
            except StepFailed as failed:
                sender.send(forwarded_error(str(failed)), flags=FINAL)
            except Exception as exc:  # noqa: BLE001 - the client gets an error, never a hang
                sender.send(error_response(exc, self.args.name), flags=FINAL)
        return None

    def serve(self, request, sender):
        stream = input_scalar(request, STREAM_INPUT.name, False, bool)
        # Every tensor by its ensemble name: the request's (copied: BLS owns its inputs), then each step's
        # outputs, kept as tensors so the arrays the next steps read stay alive.
        tensors = {t.name(): pb_utils.Tensor(t.name(), t.as_numpy().copy()) for t in request.inputs()}
        for step in self.front:
            response = call(step["model"], step_inputs(step, tensors), list(step["outputs"]))
            for output, name in step["outputs"].items():
                tensors[name] = pb_utils.get_output_tensor_by_name(response, output)
        session = pb_utils.Tensor(SESSION_INPUT.name, np.array([secrets.randbits(63)], dtype=np.uint64))
        # The first call carries the prompt; later ones only the session.
        inputs = [*step_inputs(self.decode, tensors), session]
        text, tokens = [], []
        prompt_tokens = tensors[PROMPT_TOKENS_OUTPUT.name]  # preprocess's, sent with every answer
        while True:
            response = call(self.decode["model"], inputs, CHUNK)
            delta = pb_utils.get_output_tensor_by_name(response, TEXT_OUTPUT.name).as_numpy()[0].decode("utf-8")
            ids = pb_utils.get_output_tensor_by_name(response, OUTPUT_IDS.name).as_numpy().copy()
            finished = bool(pb_utils.get_output_tensor_by_name(response, FINISHED_OUTPUT.name).as_numpy()[0])
            # An answer ended before its first token (a stop token first) still sends one, empty: it carries prompt_tokens.
            if stream and (delta or ids.size or (finished and not tokens)):
                sender.send(answer(delta, ids, prompt_tokens))
            text.append(delta)
            tokens.append(ids)
            if finished:
                break
            # Asked before the final response only: asked after it, Triton 2.51 crashed (in ResponseFactoryIsCancelled).
            if request.is_cancelled():
                call(self.decode["model"], [session, pb_utils.Tensor(CANCEL_INPUT.name, np.array([True]))], CHUNK)
                sender.send(flags=FINAL)  # nobody reads it; it completes the request
                return
            inputs = [session]
        if stream:
            sender.send(flags=FINAL)
        else:
            sender.send(answer("".join(text), np.concatenate(tokens), prompt_tokens), flags=FINAL)


def step_inputs(step, tensors):
    """The step's inputs from the tensors produced so far; an optional input the client left out stays out."""
    return [pb_utils.Tensor(name, tensors[source].as_numpy()) for name, source in step["inputs"].items() if source in tensors]


def call(model, inputs, outputs):
    response = pb_utils.InferenceRequest(model_name=model, inputs=inputs, requested_output_names=outputs).exec()
    if response.has_error():
        raise StepFailed(response.error().message())
    return response


def answer(text, tokens, prompt_tokens):
    outputs = output_tensors(answer_outputs(text, tokens))
    return pb_utils.InferenceResponse(output_tensors=[*outputs, pb_utils.Tensor(PROMPT_TOKENS_OUTPUT.name, prompt_tokens.as_numpy())])
