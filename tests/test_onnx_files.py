"""A graph and its external data as one unit: saved, linked into a repository, and read back by a later stage."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from builder.onnx_files import copy_onnx, graph_files, load_onnx


def write_graph_with_data(path: Path) -> np.ndarray:
    weight = np.arange(12, dtype=np.float32).reshape(3, 4)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [numpy_helper.from_array(weight, "w")])
    onnx.save_model(helper.make_model(graph), str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=path.name + ".data", size_threshold=0)
    return weight


def test_a_graph_whose_data_a_repository_shares_reads_back(tmp_path: Path) -> None:
    """Publishing hard-links the cache's data file into the repository; ``onnx.load`` then refuses the cache's graph
    (a possible link attack), which a later build quantizing from that cache entry must still read."""
    cached = tmp_path / "cache" / "model.onnx"
    cached.parent.mkdir()
    weight = write_graph_with_data(cached)
    copy_onnx(cached, tmp_path / "repository" / "model.onnx")
    data = graph_files(cached)[1]
    assert data.stat().st_nlink == 2
    with pytest.raises(Exception, match="hard link"):
        onnx.load(str(cached))
    (tensor,) = load_onnx(cached).graph.initializer
    np.testing.assert_array_equal(numpy_helper.to_array(tensor), weight)


def test_data_outside_the_graphs_directory_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "model.onnx"
    write_graph_with_data(path)
    model = onnx.load(str(path), load_external_data=False)
    for entry in model.graph.initializer[0].external_data:
        if entry.key == "location":
            entry.value = "../elsewhere.data"
    onnx.save_model(model, str(path))
    with pytest.raises(ValueError, match="points outside the graph's directory"):
        load_onnx(path)
