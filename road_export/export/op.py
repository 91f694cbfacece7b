"""The `road` rotation op: a torch custom op, its ONNX node, and the onnxscript function that defines it.

    road.Rotate(X, C1, C2; group_size) -> Y        (domain "road", version 1)
    Y = X * C1 + rot(X) * C2,  rot maps each group [x1 | x2] of X's last axis to [-x2 | x1]

C1 and C2 broadcast against X: shape [d], or [batch, 1, d] for per-row adapters.

Why the node is emitted bare and the function attached afterwards: `torch.onnx.export` runs its version
converter, which inlines every model-local function, so a function handed to the exporter would vanish. A node
of a domain with no function in the model is left alone; `attach_functions` then adds the definition, whose
body uses standard ops only, so stock onnxruntime runs the model (it inlines local functions at load).
"""

from __future__ import annotations

import onnx
import onnx_ir as ir
import onnxscript
import torch
from onnx.defs import OpSchema
from onnxscript import opset18 as op

from road_export import rotation

DOMAIN = "road"
VERSION = 1
OP_TYPE = "Rotate"

# --- torch side ---------------------------------------------------------------------------------------------
@torch.library.custom_op("road::rotate", mutates_args=())
def rotate(x: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor, group_size: int) -> torch.Tensor:
    """y = x * c1 + rot(x) * c2 (the eager kernel is road_export.rotation.rotate)."""
    return rotation.rotate(x, c1, c2, group_size)


@rotate.register_fake
def _rotate_fake(x: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor, group_size: int) -> torch.Tensor:
    return torch.empty_like(x)


# --- ONNX side ----------------------------------------------------------------------------------------------
_T = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)", "tensor(double)"]
SCHEMA = OpSchema(
    OP_TYPE,
    DOMAIN,
    VERSION,
    doc="RoAd rotation: Y = X * C1 + rot(X) * C2, pairs (i, i + group_size/2) inside each group of X's last axis.",
    inputs=[OpSchema.FormalParameter(n, "T") for n in ("X", "C1", "C2")],
    outputs=[OpSchema.FormalParameter("Y", "T")],
    type_constraints=[("T", _T, "float tensors")],
    attributes=[OpSchema.Attribute("group_size", OpSchema.AttrType.INT, "even group size g")],
)
road_opset = onnxscript.values.Opset(DOMAIN, VERSION)
RotateNode = onnxscript.values.Op(road_opset, OP_TYPE, SCHEMA)


def translate_rotate(x, c1, c2, group_size: int):
    """torch.ops.road.rotate -> one road.Rotate node (custom_translation_table entry)."""
    return RotateNode(x, c1, c2, group_size=group_size)


def translation_table() -> dict:
    return {torch.ops.road.rotate.default: translate_rotate}


@onnxscript.script(road_opset, default_opset=op)
def Rotate(X, C1, C2, group_size: int):
    # Y = X * C1 + X[..., perm] * S, with perm swapping the two halves of each group and S = C2 with the sign
    # of rot() folded in (-C2 on first halves). perm and S depend only on C1/C2's shape and values, so when
    # they are initializers onnxruntime constant-folds everything but Gather, Mul, Mul, Add.
    g = op.Constant(value_int=group_size)
    half = op.Div(g, op.Constant(value_int=2))
    d = op.Squeeze(op.Shape(C1, start=-1))
    idx = op.Range(op.Constant(value_int=0), d, op.Constant(value_int=1))
    pos = op.Mod(idx, g)
    perm = op.Add(op.Sub(idx, pos), op.Mod(op.Add(pos, half), g))
    first = op.Less(pos, half)
    signed = op.Where(first, op.Neg(C2), C2)
    return op.Add(op.Mul(X, C1), op.Mul(op.Gather(X, perm, axis=-1), signed))


def function_definition(opset: int) -> ir.Function:
    """The Rotate function as onnx-ir, its body at the model's default opset (ONNX wants one per domain)."""
    proto: onnx.FunctionProto = Rotate.to_function_proto()
    function = ir.serde.deserialize_function(proto)
    function.opset_imports[""] = opset
    return function


def attach_functions(model: ir.Model) -> int:
    """Add the `road` function definitions the graph uses; returns the number of road nodes."""
    count = sum(1 for node in model.graph.all_nodes() if node.domain == DOMAIN)
    if count:
        function = function_definition(model.opset_imports.get("", 18))
        model.functions[function.identifier()] = function
        model.opset_imports[DOMAIN] = VERSION
    return count
