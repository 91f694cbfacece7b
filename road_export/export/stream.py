"""Weights computed when they are written, not before: the exporter's side of bounded-memory export.

torch.onnx.export leaves each parameter as an onnx-ir tensor over the torch tensor (no copy), and nn.Linear as
`MatMul(x, Transpose(W))`. Folding those transposes (onnxscript's optimizer does) or merging adapters into copies
of the weights before the trace would each hold a second copy of every weight until the file is written.
`LazyWeightsPass` runs before the optimizer instead: every `Transpose(initializer)` becomes an initializer whose
value is an `ir.LazyTensor` (the transpose, computed from the torch tensor when the tensor is saved), and in merge
mode every adapted layer's weight and bias become lazy merges (`prepare.Merge`: R W, R b) of the base tensors.
onnx-ir's external-data save then evaluates one tensor at a time and drops it once written; a transposed weight,
merged or not, is written in blocks of a few MB of columns (`TransposedTensor`), so the largest transient copy
is a block, not a weight.

The values are the eager path's, bit for bit: the same torch merge on the same tensors, and a transpose is a copy.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx_ir as ir
import torch

from road_export.export.prepare import Merge

__all__ = ["LazyWeightsPass", "release_weights", "torch_value"]

PREFIX = "model."  # TaskModule and the positional wrapper register the user's model as `model`


def torch_value(tensor: ir.TensorProtocol) -> torch.Tensor:
    """The torch tensor under an exported initializer (torch's TorchTensor keeps it as `.raw`), else from numpy."""
    raw = getattr(tensor, "raw", None)
    return raw if isinstance(raw, torch.Tensor) else torch.from_numpy(np.asarray(tensor.numpy()))


def _lazy(source: ir.TensorProtocol, fn: Callable[[torch.Tensor], torch.Tensor], shape: tuple[int, ...],
          name: str | None) -> ir.LazyTensor:
    def compute() -> ir.Tensor:
        with torch.no_grad():
            return ir.tensor(fn(torch_value(source).detach()).contiguous().numpy())

    return ir.LazyTensor(compute, dtype=source.dtype, shape=ir.Shape(shape), name=name)


class TransposedTensor(ir.LazyTensor):
    """The transpose of a 2-D torch tensor W [rows, cols], or of its merge R W (`merge`, a `prepare.Merge` whose
    rotated axis is 0: nn.Linear's output rows), as a lazy tensor whose `tofile` (what onnx-ir's external-data
    save calls) writes it in blocks of about `BLOCK_BYTES` of the file's rows (columns of W), so no weight is ever
    copied whole, merged or not; `numpy()`/`tobytes()` (a single-file save) compute it at once. Same bytes either
    way: R only mixes row i with row i + g/2 of the same column, so R applied to a block of W's columns is that
    block of R W, the same products element for element (tests/test_scale.py compares the files byte for byte).
    A block is a multiple of `BLOCK_ALIGN` columns where it can be, so the merge's elementwise kernels see the
    same vector lengths as on the whole weight.

    Shapes and dtypes: `source` [rows, cols] of any float dtype; the tensor is [cols, rows] of the same dtype.
    `counted` is called once per evaluation (what a test counts)."""

    BLOCK_BYTES = 4 * 2**20
    BLOCK_ALIGN = 64

    def __init__(self, source: ir.TensorProtocol, dims: tuple[int, ...], counted: Callable[[], None],
                 merge: Merge | None = None) -> None:
        self._source, self._counted, self._merge = source, counted, merge
        super().__init__(self._whole, dtype=source.dtype, shape=ir.Shape(dims))

    def _weight(self, weight: torch.Tensor) -> torch.Tensor:
        return weight if self._merge is None else self._merge.weight(weight)

    def _whole(self) -> ir.Tensor:
        self._counted()
        with torch.no_grad():
            weight = self._weight(torch_value(self._source).detach())
            # dims reversed, as `.T` (deprecated on tensors of other than 2 dims) did
            return ir.tensor(weight.permute(*range(weight.ndim - 1, -1, -1)).contiguous().numpy())

    def tofile(self, file) -> None:
        self._counted()
        with torch.no_grad():
            weight = torch_value(self._source).detach()  # [rows, cols]; the file gets weight.T, [cols, rows]
            step = max(1, self.BLOCK_BYTES // max(1, weight.shape[0] * weight.element_size()))
            if step > self.BLOCK_ALIGN:
                step -= step % self.BLOCK_ALIGN
            for start in range(0, weight.shape[1], step):
                block = self._weight(weight[:, start:start + step]).T.contiguous().numpy()
                file.write(memoryview(block).cast("B"))
                del block


def _is_2d_transpose(node: ir.Node) -> bool:
    if node.op_type != "Transpose" or node.domain not in ("", "ai.onnx"):
        return False
    perm = node.attributes.get_ints("perm", None)
    return perm is None or list(perm) == [1, 0]


class LazyWeightsPass(ir.passes.InPlacePass):
    """Transposed weights and merged weights as lazy initializers (see the module docstring).

    `merges` maps a layer path (as in the user's model) to its `Merge`; its `<path>.weight` and `<path>.bias`
    initializers become lazy merges. The pass reads no weight data. `evaluations` counts the lazy tensors
    computed so far (what a test checks: nothing before the save).
    """

    def __init__(self, merges: dict[str, Merge] | None = None) -> None:
        super().__init__()
        self.merges = merges or {}
        self.evaluations = 0

    def _count(self) -> None:
        self.evaluations += 1

    def _counted(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
        def run(t: torch.Tensor) -> torch.Tensor:
            self.evaluations += 1
            return fn(t)

        return run

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        fns: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {}
        row_merges: dict[str, Merge] = {}  # weights whose rows R rotates: written transposed in blocks
        for path, merge in self.merges.items():
            fns[f"{PREFIX}{path}.weight"] = merge.weight
            fns[f"{PREFIX}{path}.bias"] = merge.bias
            if merge.axis == 0:
                row_merges[f"{PREFIX}{path}.weight"] = merge
        modified = False
        for value in list(graph.initializers.values()):
            tensor = value.const_value
            if tensor is None or value.is_graph_input() or value.is_graph_output():
                continue
            fn = fns.get(value.name or "")
            transposes = [u.node for u in value.uses() if _is_2d_transpose(u.node)] if tensor.shape.rank() == 2 \
                else []
            if fn is None and not transposes:
                continue
            base = fn or (lambda t: t)
            for node in transposes:
                out = node.outputs[0]
                dims = tuple(reversed(tensor.shape.numpy()))
                new = ir.Value(name=None, shape=ir.Shape(dims), type=ir.TensorType(tensor.dtype))
                if fn is None or value.name in row_merges:  # a plain or merged transpose: written in blocks
                    new.const_value = TransposedTensor(tensor, dims, self._count, row_merges.get(value.name or ""))
                else:
                    new.const_value = _lazy(tensor, self._counted(lambda t, base=base: base(t).T), dims, None)
                out.replace_all_uses_with(new)
                graph.remove(node, safe=True)
                name, out.name = out.name, None
                new.name = name  # the name onnxscript's folding would have given the transposed weight
                graph.register_initializer(new)
            if fn is not None and any(True for _ in value.uses()):
                value.const_value = _lazy(tensor, self._counted(fn), tuple(tensor.shape.numpy()), value.name)
            elif not any(True for _ in value.uses()):
                graph.initializers.pop(value.name)
                value.const_value = None  # the lazy tensors hold the torch tensor; the Value may outlive the graph
            modified = True
        return ir.passes.PassResult(model, modified=modified)


def release_weights(model: ir.Model) -> None:
    """Drop the model's initializer tensors once it is saved. Something may keep the graph alive after the export
    (onnxscript's optimizer leaves its last graph on a module-level rewrite rule's matcher), and the graph's
    tensors are views of the torch model's weights: without this, verify would hold the exported torch model
    next to the reference and the onnxruntime session."""
    for graph in model.graphs():
        for value in graph.initializers.values():
            value.const_value = None
        graph.initializers.clear()
