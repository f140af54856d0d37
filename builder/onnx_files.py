"""An ONNX graph on disk: ``model.onnx`` and, past protobuf's 2 GB limit, its external weights.

Every stage that writes, moves, copies or hashes a graph goes through here, so a graph over 2 GB
stays one unit: its weights live in ``<name>.data`` beside it, named after the graph file, and
the graph records that name (ONNX's ``location``) so a move renames both.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import onnx
from onnx.external_data_helper import ExternalDataInfo, uses_external_data

# protobuf refuses messages of 2 GiB; weights past this go to external data, leaving room for the graph itself.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000


def weight_bytes(model: onnx.ModelProto) -> int:
    return sum(len(t.raw_data) for t in model.graph.initializer)


def save_onnx(model: onnx.ModelProto, path: Path) -> None:
    """Writes ``model`` to ``path``; its weights to ``<path>.data`` when they are too big for one file."""
    path = Path(path)
    if weight_bytes(model) > EXTERNAL_DATA_THRESHOLD:
        data = path.with_name(path.name + ".data")
        data.unlink(missing_ok=True)  # onnx appends to an existing file
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data.name, size_threshold=1024)
    else:
        onnx.save_model(model, str(path))


def load_onnx(path: Path) -> onnx.ModelProto:
    """The graph with its weights in memory. Its data file may be hard-linked (a published repository shares it
    with the build cache), which ``onnx.load`` refuses as a possible link attack: the bytes are read here instead,
    each tensor from its own file, offset and length as the graph records them."""
    model = onnx.load(str(path), load_external_data=False)
    for tensor in _external_tensors(model):
        info = ExternalDataInfo(tensor)
        location = Path(path).parent / info.location
        if Path(info.location).is_absolute() or ".." in Path(info.location).parts:
            raise ValueError(f"{path}: tensor {tensor.name} points outside the graph's directory ({info.location})")
        with location.open("rb") as handle:
            handle.seek(info.offset or 0)
            tensor.raw_data = handle.read() if info.length is None else handle.read(info.length)
        del tensor.external_data[:]
        tensor.data_location = onnx.TensorProto.DEFAULT
    return model


def data_files(path: Path) -> list[Path]:
    """The external data files ``path`` refers to (none for a self-contained graph)."""
    path = Path(path)
    if path.stat().st_size > EXTERNAL_DATA_THRESHOLD // 4:  # the weights are inside: only small graphs have data
        return []
    # the graph alone is read: its weights' bytes stay in their files
    return [path.parent / name for name in sorted(_locations(onnx.load(str(path), load_external_data=False)))]


def graph_files(path: Path) -> list[Path]:
    """The graph file first, then its data files: what travels together."""
    return [Path(path), *data_files(path)]


def move_onnx(source: Path, target: Path) -> None:
    """Renames a graph and its data to ``target`` / ``<target>.data``, rewriting the graph's locations."""
    source, target = Path(source), Path(target)
    data = data_files(source)
    if not data:
        os.replace(source, target)
        return
    model = onnx.load(str(source), load_external_data=False)
    (old,) = {d.name for d in data}  # written by save_onnx or an exporter: one data file
    new = target.name + ".data"
    for tensor in _external_tensors(model):
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = new
    os.replace(source.parent / old, target.parent / new)
    onnx.save_model(model, str(target))
    if source != target:
        source.unlink()


def remove_onnx(path: Path) -> None:
    for file in graph_files(path):
        file.unlink(missing_ok=True)


def copy_onnx(source: Path, target: Path) -> None:
    """Places a graph and its data at ``target`` (same file names as the source's data: hard links when it can)."""
    if Path(source).name != Path(target).name and data_files(source):
        raise ValueError(f"{source} has external data named after it: copy it under the same name, not {target.name}")
    target.parent.mkdir(parents=True, exist_ok=True)
    for file in graph_files(source):
        link_or_copy(file, target if file == Path(source) else target.parent / file.name)


def link_or_copy(source: Path, target: Path) -> None:
    # Graphs can be tens of GB: hard-link from the build cache when on the same filesystem.
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def graph_sha256(path: Path) -> str:
    """One digest over the graph and its weights."""
    digest = hashlib.sha256()
    for file in graph_files(path):
        with file.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def _external_tensors(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    tensors = list(model.graph.initializer)
    for node in model.graph.node:  # Constant nodes can hold weights too
        tensors += [attr.t for attr in node.attribute if attr.HasField("t")]
    return [t for t in tensors if uses_external_data(t)]


def _locations(model: onnx.ModelProto) -> set[str]:
    return {ExternalDataInfo(t).location for t in _external_tensors(model)}
