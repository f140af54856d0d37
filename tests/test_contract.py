"""The client contract's one table against the code that reads it: the client sends each input with
the table's name and type, every sampling input has its field, the ensembles declare the table."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from builder.runtime.contract import (CLIENT_INPUTS, CLIENT_OUTPUTS, SAMPLING_INPUTS, STREAM_INPUT, STREAMING_ENSEMBLE,
                                     UNARY_ENSEMBLE)
from builder.runtime.generation import SamplingParams
from builder.serve.client import Request, request_inputs


def test_the_client_sends_every_input_as_the_table_says() -> None:
    request = Request("Hi", images=(b"png",), audio=(b"wav", b"wav"), system_prompt="Be brief.",
                      messages=[{"role": "user", "content": "Hi"}], **{t.name: t.scalar_type(1) for t in SAMPLING_INPUTS})
    sent = {i.name(): i for i in request_inputs(request, stream=True)}
    assert set(sent) == {t.name for t in (*CLIENT_INPUTS, STREAM_INPUT)}
    for tensor in (*CLIENT_INPUTS, STREAM_INPUT):
        triton_type = "BYTES" if tensor.data_type == "TYPE_STRING" else tensor.data_type.removeprefix("TYPE_")
        assert sent[tensor.name].datatype() == triton_type, tensor.name
    assert sent["audio"].shape() == [2] and sent["text_input"].shape() == [1]
    assert [i.name() for i in request_inputs(Request("Hi"))] == ["text_input"]  # unset inputs are not sent


def test_sampling_inputs_are_fields_of_the_request_and_of_the_decoder_parameters() -> None:
    for holder in (Request, SamplingParams):
        assert {t.name for t in SAMPLING_INPUTS} <= {f.name for f in dataclasses.fields(holder)}, holder


def test_the_ensembles_declare_the_table(built_repository: Path) -> None:
    for model, extra in ((UNARY_ENSEMBLE, ()), (STREAMING_ENSEMBLE, (STREAM_INPUT,))):
        config = text_format.Parse((built_repository / model / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
        declared = {i.name: (model_config_pb2.DataType.Name(i.data_type), tuple(i.dims), i.optional) for i in config.input}
        assert declared == {t.name: (t.data_type, t.dims, t.optional) for t in (*CLIENT_INPUTS, *extra)}, model
        outputs = {o.name: (model_config_pb2.DataType.Name(o.data_type), tuple(o.dims)) for o in config.output}
        assert outputs == {t.name: (t.data_type, t.dims) for t in CLIENT_OUTPUTS}, model
