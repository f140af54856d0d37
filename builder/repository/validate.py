"""Checks that a planned repository would load and wire up: configs against graphs, ensembles against models.

These are the mismatches Triton users meet most (a config whose dims disagree with the graph, an
ensemble step naming a tensor nobody produces); here they fail the build instead of the server.
"""

from __future__ import annotations

from builder.errors import BuildError
from builder.repository.plan import ModelPlan, Tensor


def check_graph_signature(plan: ModelPlan) -> None:
    """Every config tensor that the served graph also has must agree in type and dims (-1 matches any).

    A model run by Triton's own backend (ONNX Runtime, TensorRT) must also list exactly the graph's
    inputs, only outputs the graph has, and, when Triton batches it, a graph whose first axis is dynamic.
    """
    if plan.serves is None:
        return
    graph = plan.serves.graph
    if plan.python_model is None:
        _check_native_io(plan)
    by_name = {sig.name: sig for sig in (*graph.inputs, *graph.outputs)}
    for tensor in (*plan.inputs, *plan.outputs):
        sig = by_name.get(tensor.name)
        if sig is None:
            continue
        graph_dims = sig.dims[1:] if plan.adds_batch_axis or plan.max_batch_size > 0 else sig.dims
        if sig.data_type != tensor.data_type:
            raise BuildError(f"{plan.name}: config {tensor.name} is {tensor.data_type}, the graph's is {sig.data_type}")
        if not _dims_agree(tensor.dims, graph_dims):
            raise BuildError(f"{plan.name}: config {tensor.name} dims {list(tensor.dims)} disagree with the graph's {list(graph_dims)}")


def _check_native_io(plan: ModelPlan) -> None:
    assert plan.serves is not None
    graph = plan.serves.graph
    config_inputs, graph_inputs = {t.name for t in plan.inputs}, {sig.name for sig in graph.inputs}
    if config_inputs != graph_inputs:
        raise BuildError(f"{plan.name}: config inputs {sorted(config_inputs)} differ from the graph's {sorted(graph_inputs)}")
    unknown = {t.name for t in plan.outputs} - {sig.name for sig in graph.outputs}
    if unknown:
        raise BuildError(f"{plan.name}: config outputs {sorted(unknown)} are not outputs of the graph")
    if plan.max_batch_size > 0:
        fixed = [sig.name for sig in (*graph.inputs, *graph.outputs) if not sig.dims or sig.dims[0] != -1]
        if fixed:
            raise BuildError(
                f"{plan.name}: max_batch_size {plan.max_batch_size} needs a dynamic first (batch) axis, "
                f"but {', '.join(fixed)} has a fixed one"
            )


def _dims_agree(config: tuple[int, ...], graph: tuple[int, ...]) -> bool:
    if len(config) != len(graph):
        return False
    return all(c == -1 or g == -1 or c == g for c, g in zip(config, graph))


def _full_shape(model: ModelPlan, tensor: Tensor) -> tuple[int, ...]:
    """A tensor's shape as it travels between models: a batching model's config leaves out the batch axis."""
    return (-1, *tensor.dims) if model.max_batch_size > 0 else tensor.dims


def check_ensembles(plans: list[ModelPlan]) -> None:
    models = {plan.name: plan for plan in plans}
    for ensemble in (p for p in plans if p.steps):
        available: dict[str, tuple[ModelPlan, Tensor]] = {t.name: (ensemble, t) for t in ensemble.inputs}
        for step in ensemble.steps:
            model = models.get(step.model)
            if model is None:
                raise BuildError(f"{ensemble.name}: step uses model {step.model!r}, which is not in the repository")
            model_inputs = {t.name: t for t in model.inputs}
            for model_input, tensor in step.inputs.items():
                if model_input not in model_inputs:
                    raise BuildError(f"{ensemble.name}: {step.model} has no input {model_input!r}")
                if tensor not in available:
                    raise BuildError(f"{ensemble.name}: {step.model}.{model_input} reads {tensor!r}, which no earlier step produces")
                (producer, produced), wanted = available[tensor], model_inputs[model_input]
                if produced.data_type != wanted.data_type:
                    raise BuildError(
                        f"{ensemble.name}: {tensor!r} is {produced.data_type} but {step.model}.{model_input} "
                        f"wants {wanted.data_type}"
                    )
                if not _dims_agree(_full_shape(producer, produced), _full_shape(model, wanted)):
                    raise BuildError(
                        f"{ensemble.name}: {tensor!r} has shape {list(_full_shape(producer, produced))} but "
                        f"{step.model}.{model_input} wants {list(_full_shape(model, wanted))}"
                    )
            missing = [t.name for t in model.inputs if not t.optional and t.name not in step.inputs]
            if missing:
                raise BuildError(f"{ensemble.name}: step {step.model} leaves required inputs unset: {', '.join(missing)}")
            model_outputs = {t.name: t for t in model.outputs}
            for model_output, tensor in step.outputs.items():
                if model_output not in model_outputs:
                    raise BuildError(f"{ensemble.name}: {step.model} has no output {model_output!r}")
                available[tensor] = (model, model_outputs[model_output])
        for output in ensemble.outputs:
            if output.name not in available:
                raise BuildError(f"{ensemble.name}: output {output.name!r} is produced by no step")
