"""The compile stage up to the device boundary: profiles, consistency rules, plan records, the comparison plumbing."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx

from builder.compare import GateResult, OutputFigures
from builder.compile.compare import compare_with_onnxruntime, sample_feeds
from builder.spec import GateSpec
from builder.compile.plans import Device, PlanRecord, carried_plans, cc_model_filenames, plan_record, published_plans
from builder.compile.profiles import (
    AxisRange,
    Profile,
    check_profiles,
    check_request_fits,
    input_axes,
    profiles_for,
    request_ranges,
)
from builder.compile.tensorrt_build import detect_device
from builder.targets import target_for, without_gpu
from builder.errors import BuildError, SpecError
from builder.export.graph import graph_signature
from builder.runtime.gpu import query_gpu
from builder.spec import parse_spec

SPEC = parse_spec({"target": "tensorrt", "limits": {"max_images": 3, "max_audio_clips": 8, "max_prompt_tokens": 100,
                                                     "max_context": 256}, "triton": {"max_batch_size": 8}})
DEVICE = Device("NVIDIA L4", "8.9", "550.54", "10.8.0")
PASSED = GateResult(2, (OutputFigures("image_embeds", 0.9999, 1e-3, 1e-4),), ())


def encoder_onnx(path: Path, scale: float = 1.0) -> Path:
    """A stand-in encoder: [images, 4] -> [images, 2, 4], with a named dynamic batch axis."""
    weight = helper.make_tensor("w", TensorProto.FLOAT, (4, 8), (np.arange(32, dtype=np.float32) / 32 * scale).tolist())
    nodes = [helper.make_node("MatMul", ["pixel_values", "w"], ["h"]),
             helper.make_node("Reshape", ["h", "shape"], ["image_embeds"])]
    shape = helper.make_tensor("shape", TensorProto.INT64, (3,), [-1, 2, 4])
    graph = helper.make_graph(
        nodes, "encoder", [helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, ["images", 4])],
        [helper.make_tensor_value_info("image_embeds", TensorProto.FLOAT, ["images", 2, 4])], [weight, shape],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_encoder_profile_spans_one_to_max_batch_size():
    (profile,) = profiles_for("vision_encoder", SPEC)
    assert profile.axes["images"] == AxisRange(1, 3, 8) and profile.max_batch == 8
    (audio,) = profiles_for("audio_encoder", SPEC)
    assert audio.axes["clips"] == AxisRange(1, 8, 8)


def test_llm_profiles_prefill_one_prompt_and_decode_up_to_max_decode_batch():
    prefill, decode = profiles_for("llm", SPEC)
    assert prefill.axes["batch"] == AxisRange(1, 1, 1) and prefill.batch_limit == ""
    assert decode.axes["batch"] == AxisRange(1, 8, 8) and decode.batch_limit == "max_decode_batch"
    assert prefill.axes["sequence"].max == 100 and prefill.axes["past"] == AxisRange(0, 0, 0)
    assert decode.axes["sequence"] == AxisRange(1, 1, 1)
    assert decode.axes["past"].max == 255 and decode.axes["total"].max == 256
    check_request_fits("llm", (prefill, decode), request_ranges("llm", SPEC))


def test_profile_shapes_fill_named_axes(tmp_path):
    (profile,) = profiles_for("vision_encoder", SPEC)
    shapes = profile.shapes(input_axes(encoder_onnx(tmp_path / "e.onnx")))
    assert (shapes["pixel_values"].min, shapes["pixel_values"].opt, shapes["pixel_values"].max) == ((1, 4), (3, 4), (8, 4))
    with pytest.raises(BuildError, match="dynamic axis 'images' has no range"):
        Profile("all", "clips", {"clips": AxisRange(1, 1, 2)}).shapes({"pixel_values": ("images", 4)})


def test_config_max_batch_size_must_equal_every_profile_max():
    profiles = profiles_for("vision_encoder", SPEC)
    check_profiles("vision_encoder", profiles, 8)
    with pytest.raises(BuildError, match="allows batch up to 8 but the config's max_batch_size is 16"):
        check_profiles("vision_encoder", profiles, 16)
    check_profiles("llm", profiles_for("llm", SPEC), 8)  # the llm's max_decode_batch: triton.max_batch_size
    with pytest.raises(BuildError, match="'decode' allows batch up to 8 but the config's max_decode_batch is 4"):
        check_profiles("llm", profiles_for("llm", SPEC), 4)
    prefill, decode = profiles_for("llm", SPEC)
    batched_prefill = dataclasses.replace(prefill, axes={**prefill.axes, "batch": AxisRange(1, 1, 8)})
    with pytest.raises(BuildError, match="'prefill' allows batch up to 8 but it is fed one request at a time"):
        check_profiles("llm", (batched_prefill, decode), 8)


def test_request_shape_ranges_must_lie_inside_the_profiles():
    profiles = profiles_for("vision_encoder", SPEC)
    with pytest.raises(BuildError, match="images = 9, but the profiles reach only 8"):
        check_request_fits("vision_encoder", profiles, {"images": 9})
    with pytest.raises(SpecError, match=r"limits.max_images \(9\) exceeds triton.max_batch_size \(8\)"):
        target_for(parse_spec({"target": "onnxruntime", "limits": {"max_images": 9}, "triton": {"max_batch_size": 8}}))
    target_for(parse_spec({"target": "python", "limits": {"max_images": 9}, "triton": {"max_batch_size": 8}}))  # no Triton batching


def test_axis_ranges_must_be_ordered():
    with pytest.raises(BuildError, match="min <= opt <= max"):
        AxisRange(4, 2, 8)


def test_plans_are_named_for_the_compute_capability_and_listed_when_several():
    assert DEVICE.plan_file == "model_sm89.plan"
    one = [plan_record(DEVICE, "abc", PASSED, Path("model_sm89.plan"))]
    assert cc_model_filenames(one) == {}
    ampere = dataclasses.replace(DEVICE, compute_capability="8.6")
    two = [*one, plan_record(ampere, "abc", PASSED, Path("model_sm86.plan"))]
    assert cc_model_filenames(two) == {"8.9": "model_sm89.plan", "8.6": "model_sm86.plan"}


def _publish(repository: Path, records: list[PlanRecord]) -> None:
    version = repository / "vision_encoder_tensorrt" / "1"
    version.mkdir(parents=True)
    for record in records:
        (version / record.file).write_bytes(b"plan")
    manifest = {"components": {"vision_encoder": {"plans": [r.to_json() for r in records]}}}
    (repository / "manifest.json").write_text(json.dumps(manifest))


def test_other_architectures_plans_are_carried_and_recorded(tmp_path):
    ampere = Device("NVIDIA A10", "8.6", "550.54", "10.8.0")
    _publish(tmp_path, [plan_record(ampere, "abc", PASSED, Path("unused"))])
    previous = published_plans(tmp_path, "vision_encoder", "vision_encoder_tensorrt")
    assert [(r.file, r.gpu, r.comparison) for r in previous] == [("model_sm86.plan", "NVIDIA A10", PASSED)]
    carried = carried_plans(previous, DEVICE, "abc", tmp_path)
    assert carried[0].path == tmp_path / "vision_encoder_tensorrt" / "1" / "model_sm86.plan"
    assert carried_plans(previous, DEVICE, "another-graph", tmp_path) == []  # stale: dropped
    assert carried_plans(previous, ampere, "abc", tmp_path) == []  # same GPU: rebuilt, not carried


def test_mixing_tensorrt_versions_stops_the_build(tmp_path):
    older = Device("NVIDIA A10", "8.6", "535.10", "10.3.0")
    _publish(tmp_path, [plan_record(older, "abc", PASSED, Path("unused"))])
    previous = published_plans(tmp_path, "vision_encoder", "vision_encoder_tensorrt")
    with pytest.raises(BuildError, match="built with TensorRT 10.3.0 and this machine has TensorRT 10.8.0"):
        carried_plans(previous, DEVICE, "abc", tmp_path)


def test_comparison_plumbing_with_onnxruntime_on_both_sides(tmp_path):
    reference = encoder_onnx(tmp_path / "fp32.onnx")
    inputs, _ = graph_signature(reference)
    (profile,) = profiles_for("vision_encoder", SPEC)
    feeds = [sample_feeds(inputs, profile.shapes(input_axes(reference)), 2, seed) for seed in range(2)]
    gate = GateSpec(min_cosine=0.99, max_abs_error=1e-3)

    same = OnnxrtRunner(SessionFromOnnx(str(reference)), name="candidate-same")
    result = compare_with_onnxruntime(same, reference, feeds, gate)
    assert result.passed and result.samples == 2 and result.max_abs_error == 0.0 and result.worst.cosine > 0.9999

    off = OnnxrtRunner(SessionFromOnnx(str(encoder_onnx(tmp_path / "off.onnx", scale=1.01))), name="candidate-off")
    result = compare_with_onnxruntime(off, reference, feeds, gate)
    assert not result.passed and result.max_abs_error > 1e-3 and result.worst.cosine > 0.99  # fails on max |err| alone
    assert all("max|err|" in failure for failure in result.failures)


def test_llm_comparison_inputs_are_ones_of_the_mask_and_positions_after_the_past():
    signature = [("input_ids", "TYPE_INT64", (1, -1)), ("attention_mask", "TYPE_INT64", (1, -1)),
                 ("position_ids", "TYPE_INT64", (1, -1)), ("multimodal_mask", "TYPE_BOOL", (1, -1))]
    from builder.export.graph import TensorSig

    inputs = tuple(TensorSig(*s) for s in signature)
    _, decode = profiles_for("llm", SPEC)
    dims = {"input_ids": ("batch", "sequence"), "attention_mask": ("batch", "total"),
            "position_ids": ("batch", "sequence"), "multimodal_mask": ("batch", "sequence")}
    feeds = sample_feeds(inputs, decode.shapes(dims), vocab=50, seed=0)
    past = decode.axes["past"].opt
    assert feeds["attention_mask"].shape == (8, past + 1) and feeds["attention_mask"].all()
    assert feeds["position_ids"].tolist() == [[past]] * 8
    assert 0 <= feeds["input_ids"].min() and feeds["input_ids"].max() < 50


@pytest.mark.skipif(query_gpu() is not None, reason="a GPU is present")
def test_without_a_gpu_tensorrt_detection_stops_with_one_line():
    with pytest.raises(BuildError) as error:
        detect_device("tensorrt", without_gpu())
    message = str(error.value)
    assert "\n" not in message and "NVIDIA GPU" in message
    assert message.endswith("targets that work on this machine: python, onnxruntime")


def test_vision_profile_covers_every_image_size_the_checkpoint_allows(built_repository):
    """Height and width of the vision plan: one placeholder cell up to the longest edge, named as the graph names them."""
    from builder.runtime.model_facts import ModelFacts

    image = ModelFacts.load(built_repository / "preprocess" / "1" / "model_facts.json").image
    (profile,) = profiles_for("vision_encoder", SPEC, image)
    shapes = profile.shapes(input_axes(built_repository / "vision_encoder" / "1" / "model.onnx"))["pixel_values"]
    assert shapes.min == (1, 3, image.cell, image.cell)
    assert shapes.max == (8, 3, image.longest_edge, image.longest_edge)
