"""Triton model `llm` (decoupled): the decode loop over the LLM graph, streaming tokens when asked."""

import numpy as np
import triton_python_backend_utils as pb_utils

from builder.runtime.errors import RequestError
from builder.runtime.generation import LanguageModelRunner
from builder.runtime.model_facts import ModelFacts
from builder.runtime.text import TextStream, load_tokenizer
from builder.runtime.triton_io import ModelArgs, error_response, input_array, input_scalar, output_tensors, read_sampling_params


class TritonPythonModel:
    def initialize(self, args):
        self.args = ModelArgs(args)
        self.facts = ModelFacts.load(self.args.file("model_facts.json"))
        self.tokenizer = load_tokenizer(self.args.file("tokenizer.json"))
        self.runner = LanguageModelRunner(self.args.file("model.onnx"), self.facts)
        self.max_context = self.args.int("max_context")
        self.stop_ids = frozenset({self.facts.tokens.eos})

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            try:
                self.generate(request, sender)
            except Exception as exc:  # noqa: BLE001 - the error goes to this request's client
                sender.send(error_response(exc, self.args.name), flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        return None

    def generate(self, request, sender):
        a = self.args
        params = read_sampling_params(request, a.int("default_max_tokens"), a.int("max_tokens"))
        stream = input_scalar(request, "stream", False, bool)
        ids = input_array(request, "input_ids")
        if ids.size + params.max_tokens > self.max_context:
            raise RequestError(
                f"max_tokens: prompt ({ids.size} tokens) + max_tokens ({params.max_tokens}) exceeds the context of {self.max_context}"
            )
        text = TextStream(self.tokenizer)
        tokens = []
        for token in self.runner.generate(
            ids, input_array(request, "multimodal_embeds"), input_array(request, "multimodal_mask"), params, self.stop_ids
        ):
            tokens.append(token)
            delta = text.push(token)
            if stream:
                sender.send(pb_utils.InferenceResponse(output_tensors=answer(delta, [token])))
        final = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        if stream:
            tail = text.flush()
            sender.send(pb_utils.InferenceResponse(output_tensors=answer(tail, []) if tail else []), flags=final)
        else:
            text.flush()
            sender.send(pb_utils.InferenceResponse(output_tensors=answer(text.sent, tokens)), flags=final)

def answer(text, tokens):
    return output_tensors({
        "text_output": np.array([text.encode("utf-8")], dtype=np.object_),
        "output_ids": np.asarray(tokens, dtype=np.int64),
    })
