"""An OpenAI-compatible chat-completions front for the served ensembles.

Chat UIs and agents speak OpenAI's API; Triton's own OpenAI frontend refuses non-text parts. This front
(FastAPI on uvicorn) turns ``POST /v1/chat/completions`` into the client contract (``messages`` + the
``image`` / ``audio`` items its parts name, builder.runtime.contract) and calls Triton with
``tritonclient.grpc.aio``, always streaming from ``ensemble_stream``: a whole answer is joined here, ``stop`` strings
are cut here, and a stop string or a client that hangs up cancels the stream so the server stops generating.

- :mod:`.chat_request`: an OpenAI request body to the contract's inputs, every refusal naming the parameter.
- :mod:`.triton`: the async calls to Triton and its errors as OpenAI's (status, type, param).
- :mod:`.app`: the HTTP routes, SSE, the API key, the body limit and the front's own metrics.
"""

from builder.serve.openai.app import FrontSettings, create_app, served_model_name

__all__ = ["FrontSettings", "create_app", "served_model_name"]
