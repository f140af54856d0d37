"""Numpy stand-ins for the few `tensorrt` and `polygraphy.cuda` calls of builder.runtime.trt_generation (CPU tests only).

"Device memory" is one host array addressed by offsets; the "engine" runs the LLM's ONNX graph with
ONNX Runtime on tensors read from and written to that memory at the addresses the runner binds.
"""

from __future__ import annotations

import types

import numpy as np
import onnxruntime as ort

MEMORY = np.zeros(64 << 20, dtype=np.uint8)
_next = [4096]


def _malloc(nbytes: int) -> int:
    address, _next[0] = _next[0], _next[0] + (nbytes + 255) // 256 * 256
    assert _next[0] <= MEMORY.size, "fake device memory exhausted"
    return address


def _view(address: int, shape, dtype) -> np.ndarray:
    dtype = np.dtype(dtype)
    count = int(np.prod(shape))
    return MEMORY[address:address + count * dtype.itemsize].view(dtype).reshape(shape)


class DeviceArray:
    def __init__(self, shape=(), dtype=np.float32):
        self.np_dtype, self.ptr, self.allocated_nbytes = np.dtype(dtype), 0, 0
        self.resize(shape)

    @staticmethod
    def raw(shape):
        return DeviceArray(shape, np.uint8)

    def resize(self, shape):
        nbytes = int(np.prod(shape)) * self.np_dtype.itemsize
        if nbytes > self.allocated_nbytes:
            MEMORY[self.ptr:self.ptr + self.allocated_nbytes] = 0xFF  # what a reallocation leaves: garbage
            self.ptr, self.allocated_nbytes = _malloc(nbytes), nbytes
            MEMORY[self.ptr:self.ptr + nbytes] = 0xFF  # NaN if read as floats
        self.shape = tuple(shape)
        return self

    def copy_from(self, host, stream=None):
        assert host.dtype == self.np_dtype and host.shape == self.shape
        _view(self.ptr, host.shape, host.dtype)[...] = host
        return self

    def copy_to(self, host, stream=None):
        host[...] = _view(self.ptr, host.shape, host.dtype)
        return host

    def free(self):
        MEMORY[self.ptr:self.ptr + self.allocated_nbytes] = 0xFF


class _Runtime:
    @staticmethod
    def cudaMemcpy2DAsync(dst, dpitch, src, spitch, width, height, kind, stream):
        for row in range(height.value):
            s, d = src.value + row * spitch.value, dst.value + row * dpitch.value
            MEMORY[d:d + width.value] = MEMORY[s:s + width.value].copy()
        return 0

    @staticmethod
    def cudaMemsetAsync(ptr, value, count, stream):
        MEMORY[ptr.value:ptr.value + count.value] = value
        return 0


class _Wrapper:
    handle = _Runtime()

    @staticmethod
    def check(status):
        assert status == 0


class Stream:
    ptr = 1

    def synchronize(self):
        pass


cuda = types.SimpleNamespace(DeviceArray=DeviceArray, Stream=Stream, wrapper=lambda: _Wrapper,
                             MemcpyKind=types.SimpleNamespace(DeviceToDevice=3))


class Engine:
    def __init__(self, onnx_bytes: bytes, max_batch: int):
        self.session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
        self.types = {t.name: t.type for t in (*self.session.get_inputs(), *self.session.get_outputs())}
        self.names = list(self.types)
        self.num_io_tensors, self.max_batch = len(self.names), max_batch
        self.outputs = [o.name for o in self.session.get_outputs()]

    def get_tensor_name(self, index):
        return self.names[index]

    def get_tensor_dtype(self, name):
        return {"tensor(float)": np.float32, "tensor(int64)": np.int64, "tensor(bool)": np.bool_}[self.types[name]]

    def get_tensor_profile_shape(self, name, profile):
        return [(1,), (1,), (self.max_batch,)]

    def create_execution_context(self):
        return Context(self)


class Context:
    def __init__(self, engine: Engine):
        self.engine, self.shapes, self.addresses = engine, {}, {}

    def set_optimization_profile_async(self, profile, stream):
        self.profile = profile

    def set_input_shape(self, name, shape):
        self.shapes[name] = tuple(shape)
        return True

    def set_tensor_address(self, name, address):
        self.addresses[name] = address

    def execute_async_v3(self, stream):
        engine = self.engine
        feeds = {name: _view(self.addresses[name], shape, engine.get_tensor_dtype(name)).copy()
                 for name, shape in self.shapes.items()}
        for name, value in zip(engine.outputs, engine.session.run(engine.outputs, feeds)):
            _view(self.addresses[name], value.shape, value.dtype)[...] = value
        return True


def tensorrt_module(max_batch: int) -> types.ModuleType:
    trt = types.ModuleType("tensorrt")
    trt.Logger = type("Logger", (), {"WARNING": 0, "__init__": lambda self, level: None})
    trt.Runtime = lambda logger: types.SimpleNamespace(deserialize_cuda_engine=lambda data: Engine(data, max_batch))
    trt.nptype = lambda dtype: dtype
    return trt
