"""Every generated config parses as Triton's ModelConfig and agrees with the graph it serves."""

from __future__ import annotations

import dataclasses
import json

import onnx
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from builder.errors import BuildError
from builder.repository.plan import EnsembleStep, ModelPlan, Tensor
from builder.repository.render import parse_config, render_config
from builder.repository.validate import check_ensembles, check_graph_signature

_TRITON_TYPES = {onnx.TensorProto.FLOAT: model_config_pb2.TYPE_FP32, onnx.TensorProto.INT64: model_config_pb2.TYPE_INT64,
                 onnx.TensorProto.BOOL: model_config_pb2.TYPE_BOOL}


def _configs(repository):
    for path in sorted(repository.glob("*/config.pbtxt")):
        config = model_config_pb2.ModelConfig()
        text_format.Parse(path.read_text(), config)
        yield path.parent, config


def test_every_config_parses_and_names_its_directory(built_repository):
    names = set()
    for directory, config in _configs(built_repository):
        assert config.name == directory.name
        assert (directory / "1").is_dir()
        if config.backend == "python":
            assert (directory / "1" / "model.py").is_file()
        names.add(config.name)
    assert names == {"preprocess", "vision_encoder", "audio_encoder", "fuse", "llm", "ensemble", "ensemble_stream"}


def test_encoder_configs_match_their_onnx_signature(built_repository):
    """An encoder model feeds its graph the config's first input as is, and answers the graph's output with
    the images' or clips' tokens concatenated: [tokens, hidden] (images of several sizes cannot share a batch axis)."""
    for name in ("vision_encoder", "audio_encoder"):
        config = dict(_configs(built_repository))[built_repository / name]
        graph = onnx.load(str(built_repository / name / "1" / "model.onnx"), load_external_data=False).graph
        (graph_input,), (graph_output,) = graph.input, graph.output

        def dims(value):
            return [d.dim_value if d.HasField("dim_value") else -1 for d in value.type.tensor_type.shape.dim]

        assert config.input[0].name == graph_input.name and list(config.input[0].dims) == dims(graph_input)
        assert config.input[0].data_type == _TRITON_TYPES[graph_input.type.tensor_type.elem_type]
        (output,) = config.output
        assert output.name == graph_output.name and list(output.dims) == [-1, dims(graph_output)[-1]]
    assert [t.name for t in dict(_configs(built_repository))[built_repository / "vision_encoder"].input] == [
        "pixel_values", "image_sizes"]


def test_entry_points_wire_every_step(built_repository):
    """Both entry points run the same steps from their steps.json; only the streaming one is decoupled."""
    configs = {d.name: c for d, c in _configs(built_repository)}
    steps = {}
    for name in ("ensemble", "ensemble_stream"):
        steps[name] = [(s["model"], s["inputs"], s["outputs"]) for s in json.loads((built_repository / name / "1" / "steps.json").read_text())]
        produced = {t.name for t in configs[name].input}
        for model_name, inputs, outputs in steps[name]:
            model = configs[model_name]
            assert set(inputs) <= {t.name for t in model.input}
            assert set(inputs.values()) <= produced
            produced |= set(outputs.values())
        assert {t.name for t in configs[name].output} <= produced
    assert steps["ensemble"] == steps["ensemble_stream"]
    assert configs["ensemble_stream"].model_transaction_policy.decoupled
    assert not configs["ensemble"].model_transaction_policy.decoupled and not configs["llm"].model_transaction_policy.decoupled


def test_undefined_template_variable_fails_the_build():
    with pytest.raises(BuildError, match="template python_model.pbtxt.j2: .*undefined"):
        render_config("python_model.pbtxt.j2", name="x")


def test_unparsable_config_fails_the_build():
    with pytest.raises(BuildError, match="broken: rendered config.pbtxt is not a valid Triton ModelConfig"):
        parse_config('name: "x"\nmax_batch_size: "eight"\n', "broken")


def _plan(name, inputs, outputs, **kwargs):
    return ModelPlan(name, "python_model.pbtxt.j2", inputs=inputs, outputs=outputs, **kwargs)


def test_ensemble_checks_catch_miswiring():
    a = _plan("a", (Tensor("x", "TYPE_FP32", (-1,)),), (Tensor("y", "TYPE_FP32", (-1,)),))
    ok = _plan("e", (Tensor("in", "TYPE_FP32", (-1,)),), (Tensor("out", "TYPE_FP32", (-1,)),), steps=(EnsembleStep("a", {"x": "in"}, {"y": "out"}),))
    check_ensembles([a, ok])
    bad_tensor = dataclasses.replace(ok, steps=(EnsembleStep("a", {"x": "nowhere"}, {"y": "out"}),))
    with pytest.raises(BuildError, match="reads 'nowhere', which no earlier step produces"):
        check_ensembles([a, bad_tensor])
    missing_model = dataclasses.replace(ok, steps=(EnsembleStep("b", {"x": "in"}, {"y": "out"}),))
    with pytest.raises(BuildError, match="not in the repository"):
        check_ensembles([a, missing_model])
    wrong_type = dataclasses.replace(ok, inputs=(Tensor("in", "TYPE_INT64", (-1,)),))
    with pytest.raises(BuildError, match="is TYPE_INT64 but a.x wants TYPE_FP32"):
        check_ensembles([a, wrong_type])
    wrong_rank = dataclasses.replace(ok, inputs=(Tensor("in", "TYPE_FP32", (1, -1)),))
    with pytest.raises(BuildError, match=r"'in' has shape \[1, -1\] but a.x wants \[-1\]"):
        check_ensembles([a, wrong_rank])
    batching = dataclasses.replace(a, max_batch_size=4, inputs=(Tensor("x", "TYPE_FP32", (-1,), ragged=True),))
    check_ensembles([batching, wrong_rank])  # a request axis of 1 is a batching model's batch axis


def test_config_dims_must_agree_with_the_graph(built_repository, tmp_path):
    from builder.compile.artifacts import CompiledModel
    from builder.export.graph import ParityResult, graph_signature

    path = built_repository / "audio_encoder" / "1" / "model.onnx"  # fixed mel bins and frames
    inputs, outputs = graph_signature(path)
    from builder.export.graph import ExportedGraph

    graph = ExportedGraph("audio_encoder", path, inputs, outputs, ParityResult(1, 0.0, 1.0, 0.0, 0.0))
    served = CompiledModel("audio_encoder", path, "fp32", graph)
    good = _plan("audio_encoder", (Tensor("input_features", "TYPE_FP32", (-1, 16, 200)),), (), serves=served)
    check_graph_signature(good)
    wrong = dataclasses.replace(good, inputs=(Tensor("input_features", "TYPE_FP32", (-1, 128, 3000)),))
    with pytest.raises(BuildError, match=r"config input_features dims \[-1, 128, 3000\] disagree with the graph's \[-1, 16, 200\]"):
        check_graph_signature(wrong)


@pytest.mark.parametrize(("entry_points", "expected"),
                         [("unary", {"llm", "ensemble"}), ("streaming", {"llm", "ensemble_stream"})])
def test_entry_points_decide_the_ensembles_and_llm_always_holds_the_weights(entry_points, expected, tiny_spec, tmp_path):
    from builder.build import build
    from tests.conftest import CACHE

    spec = dataclasses.replace(tiny_spec, triton=dataclasses.replace(tiny_spec.triton, entry_points=entry_points))
    build(spec, tmp_path / "repo", CACHE, progress=False)
    names = {d.name for d, _ in _configs(tmp_path / "repo")}
    assert names & {"llm", "ensemble", "ensemble_stream"} == expected
    assert (tmp_path / "repo" / "llm" / "1" / "model.onnx").is_file()
    assert not (tmp_path / "repo" / "ensemble_stream" / "1" / "model.onnx").exists()  # one copy of the weights


def test_no_version_directory_is_empty(built_repository):
    """Object storage has no empty directories: an ensemble's version would vanish on upload."""
    versions = [d for d in built_repository.glob("*/1") if d.is_dir()]
    assert len(versions) >= 7 and all(any(v.iterdir()) for v in versions)
