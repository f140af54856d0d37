"""TensorRT engines through Polygraphy's TensorRT backend: the only part of the build that needs a GPU.
Strongly typed networks: every layer's precision comes from the ONNX graph (FP32, FP16, Q/DQ INT8),
so there are no precision flags and no calibrator. Verified on CPU only up to the device boundary;
``build_plan`` and ``compare_plan`` run only on a GPU build server (``make gpu-smoke``).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from builder.compare import Feeds, Gate, GateResult
from builder.compile.compare import judge_runs, run_with_onnxruntime
from builder.compile.plans import Device
from builder.compile.profiles import Profile, input_axes
from builder.errors import BuildError
from builder.runtime.gpu import query_gpu


def detect_device(target: str, alternatives: str) -> Device:
    """The GPU this build runs on and the TensorRT that builds for it; one clear line if either is missing
    (``alternatives``: the targets that build without a GPU)."""
    missing = []
    gpu = query_gpu()
    if gpu is None:
        missing.append("an NVIDIA GPU (nvidia-smi finds none)")
    has_tensorrt = importlib.util.find_spec("tensorrt") is not None
    if not has_tensorrt:
        missing.append("the tensorrt package (pip install -e '.[tensorrt]')")
    if missing:
        raise BuildError(f"target {target} needs {' and '.join(missing)}; targets that work on this machine: {alternatives}")
    import tensorrt

    assert gpu is not None
    name, capability, driver = gpu
    return Device(name, capability, driver, tensorrt.__version__)


def build_plan(onnx_path: Path, profiles: tuple[Profile, ...], plan_path: Path, timing_cache: Path) -> None:
    """Builds and saves the engine; the timing cache is read first and written back after the build."""
    from polygraphy.backend.trt import CreateConfig, EngineFromNetwork, NetworkFromOnnxPath, SaveEngine
    from polygraphy.backend.trt import Profile as TrtProfile

    axes = input_axes(onnx_path)
    trt_profiles = []
    for profile in profiles:
        trt_profile = TrtProfile()
        for name, shapes in profile.shapes(axes).items():
            trt_profile.add(name, min=shapes.min, opt=shapes.opt, max=shapes.max)
        trt_profiles.append(trt_profile)
    timing_cache.parent.mkdir(parents=True, exist_ok=True)
    network = NetworkFromOnnxPath(str(onnx_path), strongly_typed=True)
    config = CreateConfig(profiles=trt_profiles, load_timing_cache=str(timing_cache) if timing_cache.is_file() else None)
    engine = EngineFromNetwork(network, config=config, save_timing_cache=str(timing_cache))
    SaveEngine(engine, str(plan_path))()


def compare_plan(plan_path: Path, reference_onnx: Path, feeds_per_profile: list[list[Feeds]], gate: Gate) -> GateResult:
    """The engine against ONNX Runtime FP32, each profile on inputs at its own shapes."""
    from polygraphy.backend.common import BytesFromPath
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner

    engine = EngineFromBytes(BytesFromPath(str(plan_path)))
    runs = [
        run_with_onnxruntime(TrtRunner(engine, name=f"tensorrt-profile{index}", optimization_profile=index), reference_onnx, feeds)
        for index, feeds in enumerate(feeds_per_profile)
    ]
    return judge_runs(runs, gate)
