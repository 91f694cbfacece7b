"""Capturing the prepared model: the trace plan (module, sample inputs, names, dynamic axes) and the call to
`torch.onnx.export(dynamo=True)` that turns it into onnx-ir, with `road::rotate` translated to `road.Rotate`.

The exporter's own optimizer is off (`optimize=False`): it would inline the model-local road functions. See
torch's `torch/onnx/_internal/exporter/_core.py` for what the call does; post-export steps are in post.py.
"""

from __future__ import annotations

import contextlib
import io
import logging
import traceback
import warnings
from collections.abc import Iterator
from pathlib import Path

import onnx_ir as ir
import torch
from torch import nn

from road_export.core.errors import ExportBug, RoadError, first_line
from road_export.export import op as torch_op
from road_export.export.tasks import TaskModule, TaskSpec, dynamic_shapes, infer_task, nest, task_spec, trace_inputs

__all__ = ["MIN_OPSET", "Plan", "check_opset", "quiet", "torch_export", "trace_plan"]

MIN_OPSET = 7  # the oldest opset onnxruntime runs

Plan = tuple[nn.Module, tuple | dict, list[str], TaskSpec | None, dict | None]


def check_opset(opset: int | None) -> None:
    """Refuse, before any work, an opset that no ONNX release defines (RoadError); None is the exporter's (18)."""
    import onnx

    if opset is None:
        return
    newest = onnx.defs.onnx_opset_version()
    if not isinstance(opset, int) or not MIN_OPSET <= opset <= newest:
        raise RoadError(f"--opset {opset}: ONNX {onnx.__version__} defines opsets {MIN_OPSET} to {newest}; "
                        "choose one in that range (default: the exporter's, 18)")


def trace_plan(model: nn.Module, task: str | None, example_inputs, dtype: torch.dtype | None,
               order: tuple[str, ...] = ()) -> Plan:
    """(module to trace, args, input names, task spec or None, dynamic shapes) for `model`.

    A transformers model gets its task's `TaskModule` (optimum's I/O names; sample inputs built here unless
    `example_inputs` is a dict of them); any other module needs `example_inputs` (a sequence: names `input_i`, or a
    dict: its keys), cast to `dtype` when floating. Raises RoadError when neither applies or the names do not fit.
    """
    is_transformers = hasattr(model, "config") and hasattr(model.config, "vocab_size")
    if example_inputs is None and not is_transformers:
        raise RoadError(f"{type(model).__name__} is not a transformers model; pass example_inputs")
    if example_inputs is None or task is not None:
        spec = task_spec(model, task or infer_task(model), order)
        if isinstance(example_inputs, dict):
            if set(example_inputs) != set(spec.input_names):
                raise RoadError(f"example_inputs for task {spec.task} must be {list(spec.input_names)}")
            args = nest(spec, example_inputs)
        else:
            args = trace_inputs(model, spec)
        return TaskModule(model, spec), args, list(spec.input_names), spec, dynamic_shapes(spec)
    if isinstance(example_inputs, dict):
        names, args = list(example_inputs), tuple(example_inputs.values())
    else:
        args = tuple(example_inputs)
        names = [f"input_{i}" for i in range(len(args))]
    if dtype is not None:
        args = tuple(a.to(dtype) if a.is_floating_point() else a for a in args)
    return _Positional(model, names), args, names, None, None


class _Positional(nn.Module):
    """A plain module traced with positional inputs named `names` (keeps `module.model` as TaskModule does)."""

    def __init__(self, model: nn.Module, names: list[str]) -> None:
        super().__init__()
        self.model = model
        self.names = names

    def forward(self, *args):
        return self.model(*args)


def torch_export(module: nn.Module, args: tuple | dict, names: list[str], dynamic, opset: int | None, *,
                 what: str = "", user_inputs: bool = False) -> ir.Model:
    """`torch.onnx.export(dynamo=True, optimize=False)` with the road translation table; the program's onnx-ir model.

    `what` names the part being traced (e.g. "decoder_model.onnx"). When torch cannot export it: RoadError naming the
    root cause when the caller gave the example inputs (`user_inputs`: they may be what is wrong), else ExportBug
    (exit 3: road-export built the inputs for a model it takes, so the failure is ours to fix) naming the model
    class, the part and the line of the model's code where the trace stopped."""
    # torch prints the graph it could not export (hundreds of lines) to stderr: kept off the user's terminal, the
    # failure is reported in one line below
    printed = io.StringIO()
    with warnings.catch_warnings(), quiet(), contextlib.redirect_stderr(printed), contextlib.redirect_stdout(printed):
        warnings.simplefilter("ignore")
        try:
            kwargs = args if isinstance(args, dict) else None
            program = torch.onnx.export(
                module,
                () if kwargs is not None else args,
                kwargs=kwargs,
                dynamo=True,
                optimize=False,
                opset_version=opset,
                input_names=names,
                dynamic_shapes=dynamic,
                custom_translation_table=torch_op.translation_table(),
                verbose=False,
            )
        except RoadError:
            raise
        except Exception as e:
            root = e  # torch wraps the model's own error ("step 1/3 ..."): name the cause
            while root.__cause__ is not None:
                root = root.__cause__
            first = first_line(root)
            traced = type(getattr(module, "model", module)).__name__
            if user_inputs:
                raise RoadError(f"torch.onnx.export failed for {traced}: {first}") from e
            at = model_frame(root)
            part = f", {what}" if what else ""
            raise ExportBug(f"torch.onnx.export failed tracing {traced} ({torch_dtype(module)}{part}"
                            f"{', at ' + at if at else ''}): {first}; road-export takes this model, so this is a "
                            "bug of road-export: please report it with the model's config.json") from e
    return program.model


def model_frame(error: BaseException) -> str:
    """`file.py:line` of the innermost frame of `error`'s traceback in transformers' or peft's code (where a model's
    forward stopped the trace), else ""."""
    frames = traceback.extract_tb(error.__traceback__) if error.__traceback__ else []
    for frame in reversed(frames):
        if any(f"{sep}{lib}{sep}" in frame.filename for lib in ("transformers", "peft") for sep in ("/", "\\")):
            return f"{Path(frame.filename).name}:{frame.lineno} in {frame.name}"
    return ""


def torch_dtype(module: nn.Module) -> str:
    """The dtype of the module's first float parameter ("float32" without any)."""
    param = next((p for p in module.parameters() if p.is_floating_point()), None)
    return str(param.dtype).removeprefix("torch.") if param is not None else "float32"


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """torch.export, the ONNX exporter and the optimizers log a lot at WARNING; keep the user's terminal readable."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo", "torch.fx",
                                               "torch._export", "onnxscript", "onnx_ir")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)
