"""ONNX export that is verified against PyTorch before it is written, and depth of ONNX graphs."""

from __future__ import annotations

import functools
import importlib
import inspect
import os
import uuid
import warnings
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map

from tlc._inputs import ExampleInputs, as_call, batch_size_of, max_relative_error, run, to_device
from tlc.errors import SpecError, TLCError, VerificationError
from tlc.measure.count import eval_mode, model_device

WEIGHT_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})


def require(module: str) -> Any:
    """Import an optional ONNX dependency, or say how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise TLCError(f"{module} is not installed; install it with: pip install 'tlc[onnx]'") from e


def export_onnx(
    model: nn.Module,
    example_inputs: ExampleInputs,
    path: str | Path,
    *,
    opset: int | None = None,
    dynamic_batch: bool = True,
    check: bool = True,
    rtol: float = 1e-4,
) -> Path:
    """Export `model` (in eval mode) to ONNX at `path`, verified with onnxruntime before it appears.

    The dynamo exporter is tried first, the TorchScript exporter only if it raises: the TorchScript
    exporter is deprecated since PyTorch 2.9 and works by tracing, so a Python branch on a tensor
    value is frozen at the example's value with no more than a TracerWarning (Hugging Face BERT
    raises three, on shape checks that happen to be harmless), whereas torch.export treats the
    batch size symbolically and fails loudly on what it cannot capture. `opset` defaults to the
    highest version both the exporter and the installed onnxruntime support (probed by loading a
    one-node model). With `dynamic_batch`, dim 0 of every input
    and output is symbolic. With `check`, onnxruntime must reproduce PyTorch (max relative error
    <= `rtol`) on the example inputs and on a random batch of another size; otherwise
    `VerificationError` is raised and nothing is written. The file is written under a temporary name
    in the same directory and renamed into place, so `path` never holds a partial or unchecked model.
    """
    require("onnx")
    require("onnxruntime")
    example_inputs = to_device(example_inputs, model_device(model))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with eval_mode(model):
            _export_with_fallback(model, example_inputs, tmp, opset, dynamic_batch)
            if check:
                verify_onnx(model, example_inputs, tmp, rtol=rtol, dynamic_batch=dynamic_batch)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _export_with_fallback(
    model: nn.Module, example_inputs: ExampleInputs, path: Path, opset: int | None, dynamic_batch: bool
) -> None:
    """Export with the dynamo exporter, falling back to the TorchScript exporter if it raises."""
    try:
        _export_dynamo(model, example_inputs, path, opset, dynamic_batch)
        return
    except Exception as dynamo_error:  # any exporter failure means: try the other exporter
        reason = f"{type(dynamo_error).__name__}: {str(dynamo_error).strip().splitlines()[0][:300]}"
    warnings.warn(
        f"dynamo ONNX export of {type(model).__name__} failed ({reason}); using the TorchScript exporter",
        stacklevel=3,
    )
    try:
        _export_torchscript(model, example_inputs, path, opset, dynamic_batch)
    except Exception as e:
        raise TLCError(
            f"ONNX export of {type(model).__name__} failed with both exporters; dynamo: {reason}; "
            f"TorchScript: {type(e).__name__}: {e}"
        ) from e


def _export_dynamo(
    model: nn.Module, example_inputs: ExampleInputs, path: Path, opset: int | None, dynamic_batch: bool
) -> None:
    args, kwargs = as_call(example_inputs)
    dynamic_shapes = _dynamic_shapes(model, args, kwargs) if dynamic_batch else None
    torch.onnx.export(
        model, args, str(path), kwargs=kwargs, dynamo=True, dynamic_shapes=dynamic_shapes,
        opset_version=opset or _auto_opset(_exporter_max_opset("ONNX_MAX_OPSET")),
        external_data=False, verbose=False,
    )


def _export_torchscript(
    model: nn.Module, example_inputs: ExampleInputs, path: Path, opset: int | None, dynamic_batch: bool
) -> None:
    args, kwargs = as_call(example_inputs)
    names = _input_names(model, args, kwargs)
    outputs = [f"output_{i}" for i, _ in enumerate(_tensor_leaves(run(model, example_inputs)))]
    axes = {name: {0: "batch"} for name in [*names, *outputs]} if dynamic_batch else None
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="You are using the legacy TorchScript-based ONNX export")
        torch.onnx.export(
            model, args, str(path), kwargs=kwargs or None, dynamo=False, input_names=names,
            output_names=outputs, dynamic_axes=axes,
            opset_version=opset or _auto_opset(_exporter_max_opset("ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET")),
        )


def _exporter_max_opset(constant: str) -> int:
    """Highest opset an exporter emits (a private torch constant; 18 is safe for torch >= 2.4)."""
    from torch.onnx import _constants

    return int(getattr(_constants, constant, 18))


def _auto_opset(exporter_max: int) -> int:
    return min(exporter_max, onnxruntime_max_opset())


@functools.cache
def onnxruntime_max_opset() -> int:
    """Highest default-domain opset the installed onnxruntime loads, found by loading a one-node model."""
    onnx = require("onnx")
    ort = require("onnxruntime")
    from onnx import TensorProto, helper

    for version in range(onnx.defs.onnx_opset_version(), 6, -1):
        opset = helper.make_opsetid("", version)
        value = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
        graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "probe", [value],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
        ir_version = helper.find_min_ir_version_for([opset])
        proto = helper.make_model(graph, opset_imports=[opset], ir_version=ir_version)
        try:
            ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
        except Exception:  # onnxruntime raises its own error types for an unknown opset
            continue
        return version
    raise TLCError("the installed onnxruntime loads no ONNX opset >= 7")


def _bound_arguments(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """The example arguments by `forward` parameter name, in signature order."""
    try:
        bound = inspect.signature(model.forward).bind(*args, **kwargs)
    except TypeError as e:
        raise SpecError(f"example inputs do not fit {type(model).__name__}.forward: {e}") from e
    return dict(bound.arguments)


def _dynamic_shapes(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """torch.export dynamic-shape spec making dim 0 of every example tensor symbolic."""
    dim = torch.export.Dim.DYNAMIC

    def spec(t: Any) -> Any:
        return {0: dim} if isinstance(t, torch.Tensor) and t.dim() > 0 else None

    return {name: tree_map(spec, value) for name, value in _bound_arguments(model, args, kwargs).items()}


def _input_names(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[str]:
    """Graph input names: the parameter name, suffixed with an index inside nested arguments."""
    names = []
    for name, value in _bound_arguments(model, args, kwargs).items():
        if isinstance(value, torch.Tensor):
            names.append(name)
        else:
            names.extend(f"{name}_{i}" for i in range(len(_tensor_leaves(value))))
    return names


def _tensor_leaves(tree: Any) -> list[torch.Tensor]:
    return [t for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)]


def onnxruntime_session(
    path: str | Path, *, device: str | torch.device = "cpu", threads: int | None = None, spinning: bool = True
) -> Any:
    """An onnxruntime session on `path`: CUDA provider for a CUDA device, CPU provider otherwise.

    ``spinning=False`` stops its idle intra-op threads from spinning after a run: what timing several
    sessions in turn needs, since a spinning pool takes the cores the next session runs on.
    """
    ort = require("onnxruntime")
    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    providers = ["CPUExecutionProvider"]
    if torch.device(device).type == "cuda":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise SpecError(
                "device is CUDA but onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu)"
            )
        providers.insert(0, "CUDAExecutionProvider")
    return ort.InferenceSession(str(path), sess_options=options, providers=providers)


def verify_onnx(
    model: nn.Module, example_inputs: ExampleInputs, path: str | Path, *, rtol: float = 1e-4,
    dynamic_batch: bool = True,
) -> None:
    """Raise `VerificationError` unless onnxruntime on `path` reproduces `model` within `rtol`.

    Checked on the example inputs and, for a dynamic-batch graph, on a random batch of another size.
    """
    session = onnxruntime_session(path)
    batches = [example_inputs]
    if dynamic_batch:
        batches.append(random_batch(example_inputs, batch_size_of(example_inputs) + 1))
    device = model_device(model)
    for inputs in batches:
        where = f"ONNX export of {type(model).__name__} at batch size {batch_size_of(inputs)}"
        reference = to_device(run(model, to_device(inputs, device)), "cpu")
        try:
            got = [torch.from_numpy(a) for a in session.run(None, session_feed(session, inputs))]
        except Exception as e:  # onnxruntime's own error types, e.g. a batch size baked into the graph
            raise VerificationError(f"{where}: onnxruntime failed: {e}") from e
        error = max_relative_error(reference, got)
        if not error <= rtol:
            raise VerificationError(
                f"{where} does not match PyTorch: max relative error {error:.3g} > rtol {rtol:g}"
            )


def session_feed(session: Any, inputs: ExampleInputs) -> dict[str, Any]:
    """Numpy feed for an onnxruntime session: the session's inputs paired with the example tensors.

    Keyword tensors are matched by name (they keep their names through export); the remaining
    session inputs take the remaining tensors in order.
    """
    args, kwargs = as_call(inputs)
    named = {k: v for k, v in kwargs.items() if isinstance(v, torch.Tensor)}
    rest = _tensor_leaves((args, {k: v for k, v in kwargs.items() if k not in named}))
    feed = {}
    for node in session.get_inputs():
        if node.name in named:
            tensor = named.pop(node.name)
        elif rest:
            tensor = rest.pop(0)
        else:
            raise SpecError(f"no example tensor for ONNX input {node.name!r}")
        feed[node.name] = tensor.detach().cpu().numpy()
    return feed


def random_batch(example_inputs: ExampleInputs, batch_size: int) -> ExampleInputs:
    """Fresh random inputs shaped like the examples but with `batch_size` rows.

    Floating tensors are drawn uniformly within each example tensor's range, integer tensors (token
    ids) within their observed range; keyword inputs whose name contains "mask" are all ones.
    """
    generator = torch.Generator().manual_seed(0)

    def draw(t: Any, is_mask: bool = False) -> Any:
        if not isinstance(t, torch.Tensor) or t.dim() == 0:
            return t
        shape = (batch_size, *t.shape[1:])
        if is_mask:
            return torch.ones(shape, dtype=t.dtype, device=t.device)
        return _uniform_like(t, shape, generator)

    args, kwargs = as_call(example_inputs)
    if isinstance(example_inputs, torch.Tensor):
        return draw(example_inputs)
    if kwargs:
        return {k: tree_map(functools.partial(draw, is_mask="mask" in k.lower()), v)
                for k, v in kwargs.items()}
    return type(example_inputs)(tree_map(draw, list(args)))


def _uniform_like(t: torch.Tensor, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """Values uniform over [t.min(), t.max()]: real-valued for floats, integers (inclusive) otherwise."""
    if t.numel() == 0:
        return torch.empty(shape, dtype=t.dtype, device=t.device)
    lo, hi = t.min().item(), t.max().item()
    if t.is_floating_point() or t.is_complex():
        u = torch.rand(shape, generator=generator, dtype=torch.float64)
        return (lo + (hi - lo) * u).to(dtype=t.dtype, device=t.device)
    ints = torch.randint(int(lo), int(hi) + 1, shape, generator=generator)
    return ints.to(dtype=t.dtype, device=t.device)


def _load_graph(path_or_model: Any) -> Any:
    """The top-level graph of an ONNX file or ModelProto (weights are not loaded)."""
    onnx = require("onnx")
    if isinstance(path_or_model, onnx.ModelProto):
        return path_or_model.graph
    return onnx.load(str(path_or_model), load_external_data=False).graph


def onnx_op_counts(path_or_model: str | Path | Any) -> dict[str, int]:
    """How many nodes of each op type the top-level ONNX graph has."""
    return dict(Counter(node.op_type for node in _load_graph(path_or_model).node))


def onnx_depth(path_or_model: str | Path | Any) -> int:
    """Weight layers on the longest input-to-output path of an ONNX graph.

    A weight layer is a Conv, ConvTranspose, Gemm or MatMul with one constant operand (an
    initializer, a Constant node, or anything computed from constants only, such as a transposed
    or reshaped weight) and one activation operand; a product of two activations (attention's
    q @ k^T) is not one. Nodes inside control-flow subgraphs are not looked into.
    """
    graph = _load_graph(path_or_model)
    constant = {init.name for init in graph.initializer} | {""}
    depth = {value.name: 0 for value in graph.input if value.name not in constant}
    for node in _topological(graph):
        if _is_constant(node, constant):
            constant.update(node.output)
            continue
        live = [depth[name] for name in node.input if name in depth]
        if not live:
            continue
        d = max(live) + _is_weight_layer(node, constant)
        for name in node.output:
            depth[name] = d
    return max((depth.get(value.name, 0) for value in graph.output), default=0)


def _is_constant(node: Any, constant: set[str]) -> bool:
    if node.op_type == "Constant":
        return True
    return bool(node.input) and all(name in constant for name in node.input)


def _is_weight_layer(node: Any, constant: set[str]) -> bool:
    if node.op_type not in WEIGHT_OPS:
        return False
    operands = node.input[:2]
    return any(name in constant for name in operands) and not all(name in constant for name in operands)


def _topological(graph: Any) -> Iterator[Any]:
    """Nodes of `graph` so that every node comes after the producers of its inputs (Kahn's algorithm)."""
    producer = {out: i for i, node in enumerate(graph.node) for out in node.output}
    waiting = {i: {producer[n] for n in node.input if n in producer} for i, node in enumerate(graph.node)}
    consumers: dict[int, list[int]] = {i: [] for i in waiting}
    for i, deps in waiting.items():
        for j in deps:
            consumers[j].append(i)
    ready = [i for i, deps in waiting.items() if not deps]
    while ready:
        i = ready.pop()
        yield graph.node[i]
        for j in consumers[i]:
            waiting[j].discard(i)
            if not waiting[j]:
                ready.append(j)
