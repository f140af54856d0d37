"""Triton model `llm_stream` (decoupled): the streaming entry point's decode step, holding no weights.

Each request opens a session on `llm` (the model with the weights) and polls it with plain BLS
calls until the answer ends, sending a response per chunk of tokens when `stream` is set, else one
with the whole answer (see mmtb_runtime.sessions for why not decoupled BLS). `execute` blocks for
the request it serves: instances, not threads, give concurrency (`count` in config.pbtxt).
"""

import secrets

import numpy as np
import triton_python_backend_utils as pb_utils

from mmtb_runtime.contract import OUTPUT_IDS, STREAM_INPUT, TEXT_OUTPUT
from mmtb_runtime.triton_io import ModelArgs, answer_outputs, error_response, forwarded_error, input_scalar, output_tensors

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
CHUNK = [TEXT_OUTPUT.name, OUTPUT_IDS.name, "finished"]


class TritonPythonModel:
    def initialize(self, args):
        self.args = ModelArgs(args)
        self.decode_model = self.args.parameters["decode_model"]

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            try:
                self.serve(request, sender)
            except Exception as exc:  # noqa: BLE001 - the client gets an error, never a hang
                sender.send(error_response(exc, self.args.name), flags=FINAL)
        return None

    def serve(self, request, sender):
        stream = input_scalar(request, STREAM_INPUT.name, False, bool)
        session = pb_utils.Tensor("session", np.array([secrets.randbits(63)], dtype=np.uint64))
        # The first call carries the prompt; later ones only the session. Inputs are copied: BLS owns them.
        inputs = [pb_utils.Tensor(t.name(), t.as_numpy().copy()) for t in request.inputs() if t.name() != STREAM_INPUT.name]
        inputs.append(session)
        text, tokens = [], []
        while True:
            response = pb_utils.InferenceRequest(
                model_name=self.decode_model, inputs=inputs, requested_output_names=CHUNK).exec()
            if response.has_error():
                sender.send(forwarded_error(response.error().message()), flags=FINAL)
                return
            delta = pb_utils.get_output_tensor_by_name(response, TEXT_OUTPUT.name).as_numpy()[0].decode("utf-8")
            ids = pb_utils.get_output_tensor_by_name(response, OUTPUT_IDS.name).as_numpy().copy()
            finished = bool(pb_utils.get_output_tensor_by_name(response, "finished").as_numpy()[0])
            if stream and (delta or ids.size):
                sender.send(answer(delta, ids))
            text.append(delta)
            tokens.append(ids)
            if finished:
                break
            inputs = [session]
        if stream:
            sender.send(flags=FINAL)
        else:
            sender.send(answer("".join(text), np.concatenate(tokens)), flags=FINAL)


def answer(text, tokens):
    return pb_utils.InferenceResponse(output_tensors=output_tensors(answer_outputs(text, tokens)))
