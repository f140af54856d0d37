"""Triton model `generate`: the unary entry point; collects the decoupled `llm` model's stream.

A unary infer on a decoupled ensemble is refused, and a second copy of the LLM would double its
memory, so the unary ensemble ends here and this model calls `llm` through BLS.
"""

import numpy as np
import triton_python_backend_utils as pb_utils

from builder.runtime.errors import RequestError
from builder.runtime.triton_io import ModelArgs, respond_each

FORWARDED = ("input_ids", "multimodal_embeds", "multimodal_mask", "max_tokens", "temperature", "top_k", "top_p", "seed")


class TritonPythonModel:
    def initialize(self, args):
        self.args = ModelArgs(args)
        self.llm = self.args.parameters["llm_model"]

    def handle(self, request):
        inputs = [t for t in (pb_utils.get_input_tensor_by_name(request, n) for n in FORWARDED) if t is not None]
        inputs.append(pb_utils.Tensor("stream", np.array([False])))
        call = pb_utils.InferenceRequest(model_name=self.llm, inputs=inputs, requested_output_names=["text_output", "output_ids"])
        outputs = {}
        for response in call.exec(decoupled=True):
            if response.has_error():  # the llm's own message, unchanged; BLS drops its status code
                message = response.error().message()
                internal = message.startswith(f"{self.llm}: internal error")
                raise (RuntimeError if internal else RequestError)(message)
            for name in ("text_output", "output_ids"):
                tensor = pb_utils.get_output_tensor_by_name(response, name)
                if tensor is not None:
                    outputs[name] = tensor.as_numpy().copy()  # the view dies with its response
        return outputs

    def execute(self, requests):
        return respond_each(requests, self.args.name, self.handle)
