"""The `road` ONNX ops, torch-free: schemas, names and the function bodies that define them.

    road.Rotate(X, C1, C2; group_size) -> Y        (domain "road", version 1)
    Y = X * C1 + rot(X) * C2,  rot maps each group [x1 | x2] of X's last axis to [-x2 | x1]
    road.RotateTied(X, C1, C2; group_size) -> Y    the same op when both halves of every group share C1/C2
    road.MatMulRotate(X, W, C1, C2; group_size) -> Y               Y = Rotate(X @ W, C1, C2)
    road.MatMulRotateRows(X, W, C1, C2, adapter_ids; group_size)   the same, row b of X using C1[adapter_ids[b]]
    road.LinearRotate(X, W, C1, C2; group_size) -> Y               Y = Rotate(X @ W^T, C1, C2), W [n, k]
    road.LinearRotateRows(X, W, C1, C2, adapter_ids; group_size)   the same with banks
    road.MatMulNBitsRotate(A, B, scales, C1, C2; K, N, bits, block_size, group_size)
                                                     Y = Rotate(com.microsoft.MatMulNBits(A, B, scales), C1, C2)
    road.MatMulNBitsRotateRows(A, B, scales, C1, C2, adapter_ids; K, N, bits, block_size, group_size)

X: any float tensor [..., d] (float, float16, bfloat16, double); C1 and C2 broadcast against X: shape [d], or
[batch, 1, d] for per-row adapters; group_size g is even and divides d. The MatMul forms take W [k, n] (X [..., k],
Y [..., n]); in MatMulRotateRows C1/C2 are banks [adapters, n] and adapter_ids int64 [batch] picks a bank row
for each index of X's first axis. They exist for onnxruntime's CUDA provider, where one node instead of two
saves a node's host cost (passes/matmul_rotate.py writes them in memory when a session opens on CUDA). The
Linear and MatMulNBits forms keep the weight as [n, k] rows (a torch Linear weight; MatMulNBits' quantized blocks
[N, K / block_size, block_size * bits / 8] with scales [N * K / block_size], symmetric: no zero points), the layout
in which the CUDA kernel reads each output column's weights contiguously (passes/linear_rotate.py writes them into
onnxruntime-genai model directories for CUDA, where the file itself must hold the fused node). The maths
follows peft's `src/peft/tuners/road/layer.py` (`_apply_road`), see road_export/core/rotation.py.

Why nodes are emitted bare and the functions attached afterwards: `torch.onnx.export` runs its version
converter, which inlines every model-local function, so a function handed to the exporter would vanish. A node
of a domain with no function in the model is left alone; `attach_functions` then adds the definitions, whose
bodies use standard ops only, so stock onnxruntime runs the model (it inlines local functions at load). The torch
custom op `road::rotate` and its translation to these nodes live in road_export/export/op.py.
"""

from __future__ import annotations

import onnx
import onnx_ir as ir
import onnxscript
from onnx.defs import OpSchema
from onnxscript import opset18 as op

__all__ = [
    "DOMAIN", "LINEAR_OP_TYPE", "LINEAR_ROWS_OP_TYPE", "MATMUL_OP_TYPE", "MATMUL_ROWS_OP_TYPE", "MICROSOFT",
    "NBITS_OP_TYPE", "NBITS_ROWS_OP_TYPE", "OP_TYPE", "SCHEMA", "TIED_OP_TYPE", "TIED_SCHEMA", "VERSION",
    "LinearRotate", "LinearRotateRows", "MatMulNBitsRotate", "MatMulNBitsRotateRows", "MatMulRotate",
    "MatMulRotateRows", "Rotate", "RotateNode", "attach_functions", "function_definition", "register_schemas",
    "road_opset", "tied_function_definition",
]

DOMAIN = "road"
VERSION = 1
OP_TYPE = "Rotate"

_T = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)", "tensor(double)"]
TIED_OP_TYPE = "RotateTied"  # road_1's coefficients: both halves of a group share c1/c2 (see passes/lower.py)
MATMUL_OP_TYPE = "MatMulRotate"  # X @ W then the rotation (passes/matmul_rotate.py, for CUDA sessions)
MATMUL_ROWS_OP_TYPE = "MatMulRotateRows"  # the same with coefficient banks picked per row by adapter_ids
LINEAR_OP_TYPE = "LinearRotate"  # X @ W^T (W [n, k]) then the rotation (passes/linear_rotate.py)
LINEAR_ROWS_OP_TYPE = "LinearRotateRows"
NBITS_OP_TYPE = "MatMulNBitsRotate"  # com.microsoft.MatMulNBits then the rotation (passes/linear_rotate.py)
NBITS_ROWS_OP_TYPE = "MatMulNBitsRotateRows"
MICROSOFT = "com.microsoft"


def _same_as_x(ctx) -> None:
    """Type and shape inference of both road ops: Y has X's element type and shape (symbolic dims included)."""
    if ctx.has_input(0):
        ctx.set_output_type(0, ctx.get_input_type(0))


def _schema(op_type: str, doc: str) -> OpSchema:
    schema = OpSchema(
        op_type,
        DOMAIN,
        VERSION,
        doc=doc,
        inputs=[OpSchema.FormalParameter(n, "T") for n in ("X", "C1", "C2")],
        outputs=[OpSchema.FormalParameter("Y", "T")],
        type_constraints=[("T", _T, "float tensors")],
        attributes=[OpSchema.Attribute("group_size", OpSchema.AttrType.INT, "even group size g")],
    )
    schema.set_type_and_shape_inference_function(_same_as_x)
    return schema


def _matmul_output(ctx) -> None:
    """Type and shape inference of the MatMul forms: Y has X's element type and shape X[:-1] + [W's last axis]."""
    _product_output(ctx, lambda w: w.tensor_type.shape.dim[1] if len(w.tensor_type.shape.dim) == 2 else None)


def _matmul_schema(op_type: str, rows: bool, doc: str) -> OpSchema:
    names = ["X", "W", "C1", "C2"]
    inputs = [OpSchema.FormalParameter(n, "T") for n in names]
    constraints = [("T", _T, "float tensors")]
    if rows:
        inputs.append(OpSchema.FormalParameter("adapter_ids", "I"))
        constraints.append(("I", ["tensor(int64)"], "adapter ids"))
    schema = OpSchema(op_type, DOMAIN, VERSION, doc=doc, inputs=inputs,
                      outputs=[OpSchema.FormalParameter("Y", "T")], type_constraints=constraints,
                      attributes=[OpSchema.Attribute("group_size", OpSchema.AttrType.INT, "even group size g")])
    schema.set_type_and_shape_inference_function(_matmul_output)
    return schema


def _linear_output(ctx) -> None:
    """Type and shape inference of the Linear forms: Y has X's type and shape X[:-1] + [W's first axis]."""
    _product_output(ctx, lambda w: w.tensor_type.shape.dim[0] if len(w.tensor_type.shape.dim) == 2 else None)


def _nbits_output(ctx) -> None:
    """Type and shape inference of the MatMulNBits forms: Y has A's type and shape A[:-1] + [N]."""
    n = ctx.get_attribute("N") if hasattr(ctx, "get_attribute") else None
    value = onnx.helper.get_attribute_value(n) if n is not None else None
    dim = onnx.TensorShapeProto.Dimension(dim_value=value) if isinstance(value, int) else None
    _product_output(ctx, lambda w: dim)


def _product_output(ctx, last) -> None:
    if not ctx.has_input(0):
        return
    out = onnx.TypeProto()
    out.CopyFrom(ctx.get_input_type(0))
    w = ctx.get_input_type(1) if ctx.has_input(1) else None
    dims = out.tensor_type.shape.dim
    found = last(w) if w is not None and w.tensor_type.HasField("shape") else None
    if len(dims) and found is not None:
        dims[len(dims) - 1].CopyFrom(found)
    elif len(dims):
        dims[len(dims) - 1].Clear()
    ctx.set_output_type(0, out)


def _product_schema(op_type: str, names: list[str], rows: bool, nbits: bool, doc: str, infer) -> OpSchema:
    inputs = [OpSchema.FormalParameter(n, "Q" if n == "B" and nbits else "T") for n in names]
    constraints = [("T", _T[:3] if nbits else _T, "float tensors")]
    if nbits:
        constraints.append(("Q", ["tensor(uint8)"], "quantized blocks"))
    if rows:
        inputs.append(OpSchema.FormalParameter("adapter_ids", "I"))
        constraints.append(("I", ["tensor(int64)"], "adapter ids"))
    attributes = [OpSchema.Attribute("group_size", OpSchema.AttrType.INT, "even group size g")]
    if nbits:
        attributes += [OpSchema.Attribute(a, OpSchema.AttrType.INT, f"MatMulNBits' {a}")
                       for a in ("K", "N", "bits", "block_size")]
    schema = OpSchema(op_type, DOMAIN, VERSION, doc=doc, inputs=inputs, outputs=[OpSchema.FormalParameter("Y", "T")],
                      type_constraints=constraints, attributes=attributes)
    schema.set_type_and_shape_inference_function(infer)
    return schema


SCHEMA = _schema(OP_TYPE, "RoAd rotation: Y = X * C1 + rot(X) * C2, pairs (i, i + group_size/2) inside each group "
                 "of X's last axis.")
TIED_SCHEMA = _schema(TIED_OP_TYPE, "RoAd rotation whose two halves of every group share C1/C2 (road_1): the same "
                      "Y = X * C1 + rot(X) * C2.")


MATMUL_SCHEMA = _matmul_schema(MATMUL_OP_TYPE, False, "Y = Rotate(X @ W, C1, C2): W [k, n], X [..., k].")
MATMUL_ROWS_SCHEMA = _matmul_schema(MATMUL_ROWS_OP_TYPE, True, "Y = Rotate(X @ W, C1[adapter_ids], C2[adapter_ids]): "
                                    "banks C1/C2 [adapters, n], one id per index of X's first axis.")
LINEAR_SCHEMA = _product_schema(LINEAR_OP_TYPE, ["X", "W", "C1", "C2"], False, False,
                                "Y = Rotate(X @ W^T, C1, C2): W [n, k], X [..., k].", _linear_output)
LINEAR_ROWS_SCHEMA = _product_schema(LINEAR_ROWS_OP_TYPE, ["X", "W", "C1", "C2"], True, False,
                                     "Y = Rotate(X @ W^T, C1[adapter_ids], C2[adapter_ids]).", _linear_output)
NBITS_SCHEMA = _product_schema(NBITS_OP_TYPE, ["A", "B", "scales", "C1", "C2"], False, True,
                               "Y = Rotate(com.microsoft.MatMulNBits(A, B, scales), C1, C2), symmetric blocks.",
                               _nbits_output)
NBITS_ROWS_SCHEMA = _product_schema(NBITS_ROWS_OP_TYPE, ["A", "B", "scales", "C1", "C2"], True, True,
                                    "Y = Rotate(com.microsoft.MatMulNBits(A, B, scales), C1[adapter_ids], "
                                    "C2[adapter_ids]).", _nbits_output)


def register_schemas() -> list[str]:
    """Register the `road` ops' schemas, with their shape inference (Y: X's type and shape), in onnx's schema
    registry for this process; returns the op types newly registered (none when already there).

    With them, tools that infer one node at a time without the model's local functions work on rotate-mode files:
    onnx's `shape_inference.infer_shapes`, onnxruntime's `SymbolicShapeInference.infer_shapes` (with or without
    auto_merge) and so `onnxruntime.quantization.shape_inference.quant_pre_process`. Registration lasts for the
    process; `import road_export.graph.ops` is enough to trigger it.
    """
    done = []
    for schema in (SCHEMA, TIED_SCHEMA, MATMUL_SCHEMA, MATMUL_ROWS_SCHEMA, LINEAR_SCHEMA, LINEAR_ROWS_SCHEMA,
                   NBITS_SCHEMA, NBITS_ROWS_SCHEMA):
        if not onnx.defs.has(schema.name, schema.since_version, schema.domain):
            onnx.defs.register_schema(schema)
            done.append(schema.name)
    return done
road_opset = onnxscript.values.Opset(DOMAIN, VERSION)
RotateNode = onnxscript.values.Op(road_opset, OP_TYPE, SCHEMA)


@onnxscript.script(road_opset, default_opset=op)
def Rotate(X, C1, C2, group_size: int):
    """road.Rotate's body: Y = X * C1 + rot(X) * C2 in standard ops (X [..., d]; C1, C2 broadcast to X)."""
    # Y = X * C1 + swap(X) * S: swap exchanges the two halves of each group (one reversed Slice over a
    # [-1, 2, g/2] view), S is C2 with the sign of rot() folded in (-C2 on first halves). S depends only on C2, so
    # onnxruntime constant-folds it when C2 is an initializer: Slice, Mul, Mul, Add remain.
    g = op.Constant(value_int=group_size)
    half = op.Div(g, op.Constant(value_int=2))
    grouped_shape = op.Concat(op.Constant(value_ints=[-1, 2]), op.Reshape(half, op.Constant(value_ints=[1])), axis=0)
    grouped = op.Reshape(X, grouped_shape)
    swapped_grouped = op.Slice(grouped, op.Constant(value_ints=[-1]), op.Constant(value_ints=[-9223372036854775807]),
                               op.Constant(value_ints=[1]), op.Constant(value_ints=[-1]))
    swapped = op.Reshape(swapped_grouped, op.Shape(X))
    d = op.Squeeze(op.Shape(C2, start=-1))
    pos = op.Mod(op.Range(op.Constant(value_int=0), d, op.Constant(value_int=1)), g)
    signed = op.Where(op.Less(pos, half), op.Neg(C2), C2)
    return op.Add(op.Mul(X, C1), op.Mul(swapped, signed))


@onnxscript.script(road_opset, default_opset=op)
def MatMulRotate(X, W, C1, C2, group_size: int):
    """road.MatMulRotate's body: road.Rotate of MatMul(X, W) (attach_functions adds Rotate's definition)."""
    return Rotate(op.MatMul(X, W), C1, C2, group_size=group_size)


@onnxscript.script(road_opset, default_opset=op)
def MatMulRotateRows(X, W, C1, C2, adapter_ids, group_size: int):
    """road.MatMulRotateRows's body: bank rows gathered by adapter_ids, shaped [batch, 1, ..., 1, n] against the
    product, into road.Rotate."""
    Y = op.MatMul(X, W)
    inner = op.Shape(Y, start=1, end=-1)
    ones = op.Expand(op.Constant(value_ints=[1]), op.Shape(inner))
    shape = op.Concat(op.Shape(adapter_ids), ones, op.Shape(C1, start=-1), axis=0)
    R1 = op.Reshape(op.Gather(C1, adapter_ids, axis=0), shape)
    R2 = op.Reshape(op.Gather(C2, adapter_ids, axis=0), shape)
    return Rotate(Y, R1, R2, group_size=group_size)


msft = onnxscript.values.Opset(MICROSOFT, 1)


@onnxscript.script(road_opset, default_opset=op)
def LinearRotate(X, W, C1, C2, group_size: int):
    """road.LinearRotate's body: road.Rotate of X @ W^T (W [n, k], a Linear weight)."""
    return Rotate(op.MatMul(X, op.Transpose(W, perm=[1, 0])), C1, C2, group_size=group_size)


@onnxscript.script(road_opset, default_opset=op)
def LinearRotateRows(X, W, C1, C2, adapter_ids, group_size: int):
    """road.LinearRotateRows's body: as MatMulRotateRows's, with W [n, k]."""
    Y = op.MatMul(X, op.Transpose(W, perm=[1, 0]))
    inner = op.Shape(Y, start=1, end=-1)
    ones = op.Expand(op.Constant(value_ints=[1]), op.Shape(inner))
    shape = op.Concat(op.Shape(adapter_ids), ones, op.Shape(C1, start=-1), axis=0)
    R1 = op.Reshape(op.Gather(C1, adapter_ids, axis=0), shape)
    R2 = op.Reshape(op.Gather(C2, adapter_ids, axis=0), shape)
    return Rotate(Y, R1, R2, group_size=group_size)


@onnxscript.script(road_opset, default_opset=op)
def MatMulNBitsRotate(A, B, scales, C1, C2, K: int, N: int, bits: int, block_size: int, group_size: int):
    """road.MatMulNBitsRotate's body: road.Rotate of onnxruntime's com.microsoft.MatMulNBits(A, B, scales)."""
    return Rotate(msft.MatMulNBits(A, B, scales, K=K, N=N, bits=bits, block_size=block_size), C1, C2,
                  group_size=group_size)


@onnxscript.script(road_opset, default_opset=op)
def MatMulNBitsRotateRows(A, B, scales, C1, C2, adapter_ids, K: int, N: int, bits: int, block_size: int,
                          group_size: int):
    """road.MatMulNBitsRotateRows's body: MatMulNBits, then the bank rows picked by adapter_ids into road.Rotate."""
    Y = msft.MatMulNBits(A, B, scales, K=K, N=N, bits=bits, block_size=block_size)
    inner = op.Shape(Y, start=1, end=-1)
    ones = op.Expand(op.Constant(value_ints=[1]), op.Shape(inner))
    shape = op.Concat(op.Shape(adapter_ids), ones, op.Shape(C1, start=-1), axis=0)
    R1 = op.Reshape(op.Gather(C1, adapter_ids, axis=0), shape)
    R2 = op.Reshape(op.Gather(C2, adapter_ids, axis=0), shape)
    return Rotate(Y, R1, R2, group_size=group_size)


def function_definition(opset: int) -> ir.Function:
    """The Rotate function as onnx-ir, its body at the model's default opset (ONNX wants one per domain)."""
    proto: onnx.FunctionProto = Rotate.to_function_proto()
    function = ir.serde.deserialize_function(proto)
    function.opset_imports[""] = opset
    return function


def _script_definition(script) -> object:
    def build(opset: int) -> ir.Function:
        function = ir.serde.deserialize_function(script.to_function_proto())
        function.opset_imports[""] = opset
        return function
    return build


def tied_function_definition(opset: int) -> ir.Function:
    """RotateTied: the same op when both halves of each group share coefficients, as one RotaryEmbedding.

    Groups are laid along RotaryEmbedding's sequence axis: X [..., d] -> [-1, d/g, g] with one head of size g,
    positions 0..d/g-1, and cos/sin caches [d/g, g/2] taken from the first half of each group of C1/C2.
    Standard RotaryEmbedding (opset 23) wants batch-sized position_ids; the com.microsoft one takes a single
    offset, which stays constant.
    """
    from onnx import helper

    def const(name: str, values: list[int]) -> onnx.NodeProto:
        return helper.make_node("Constant", [], [name], value_ints=values)

    group = onnx.AttributeProto(name="value_int", ref_attr_name="group_size", type=onnx.AttributeProto.INT)
    g_scalar = helper.make_node("Constant", [], ["g_scalar"])
    g_scalar.attribute.append(group)
    nodes = [
        g_scalar,
        const("two", [2]),
        const("minus_one", [-1]),
        const("zero", [0]),
        const("one", [1]),
        helper.make_node("Reshape", ["g_scalar", "one"], ["g"]),
        helper.make_node("Div", ["g", "two"], ["half"]),
        helper.make_node("Shape", ["C1"], ["d"], start=-1),
        helper.make_node("Div", ["d", "g"], ["groups"]),
        helper.make_node("Concat", ["minus_one", "groups", "g"], ["x3_shape"], axis=0),
        helper.make_node("Reshape", ["X", "x3_shape"], ["x3"]),
        helper.make_node("Concat", ["groups", "two", "half"], ["cache3_shape"], axis=0),
        helper.make_node("Concat", ["groups", "half"], ["cache_shape"], axis=0),
        helper.make_node("Reshape", ["C1", "cache3_shape"], ["c1_3"]),
        helper.make_node("Slice", ["c1_3", "zero", "one", "one"], ["cos3"]),
        helper.make_node("Reshape", ["cos3", "cache_shape"], ["cos"]),
        helper.make_node("Reshape", ["C2", "cache3_shape"], ["c2_3"]),
        helper.make_node("Slice", ["c2_3", "zero", "one", "one"], ["sin3"]),
        helper.make_node("Reshape", ["sin3", "cache_shape"], ["sin"]),
    ]
    imports = [helper.make_opsetid("", opset)]
    if opset >= 23:
        nodes += [
            helper.make_node("Size", ["X"], ["numel"]),
            helper.make_node("Div", ["numel", "d"], ["rows"]),
            helper.make_node("Concat", ["rows", "groups"], ["pid_shape"], axis=0),
            helper.make_node("Squeeze", ["groups"], ["groups_scalar"]),
            helper.make_node("Range", ["zero_scalar", "groups_scalar", "one_scalar"], ["positions"]),
            helper.make_node("Expand", ["positions", "pid_shape"], ["position_ids"]),
            helper.make_node("RotaryEmbedding", ["x3", "cos", "sin", "position_ids"], ["y3"], interleaved=0,
                             num_heads=1),
        ]
        nodes.insert(0, helper.make_node("Constant", [], ["zero_scalar"], value_int=0))
        nodes.insert(0, helper.make_node("Constant", [], ["one_scalar"], value_int=1))
    else:
        nodes += [
            helper.make_node("RotaryEmbedding", ["x3", "zero", "cos", "sin"], ["y3"], domain=MICROSOFT,
                             interleaved=0, num_heads=1),
        ]
        imports.append(helper.make_opsetid(MICROSOFT, 1))
    nodes += [
        helper.make_node("Shape", ["X"], ["x_shape"]),
        helper.make_node("Reshape", ["y3", "x_shape"], ["Y"]),
    ]
    proto = helper.make_function(DOMAIN, TIED_OP_TYPE, ["X", "C1", "C2"], ["Y"], nodes, imports, ["group_size"])
    return ir.serde.deserialize_function(proto)


def attach_functions(model: ir.Model) -> int:
    """Add the definitions of the `road` ops the graph uses; returns the number of road nodes."""
    used = {node.op_type for node in model.graph.all_nodes() if node.domain == DOMAIN}
    if used & {MATMUL_OP_TYPE, MATMUL_ROWS_OP_TYPE, LINEAR_OP_TYPE, LINEAR_ROWS_OP_TYPE, NBITS_OP_TYPE,
               NBITS_ROWS_OP_TYPE}:
        used.add(OP_TYPE)  # their bodies call road.Rotate
    opset = model.opset_imports.get("", 18)
    builders = {OP_TYPE: function_definition, TIED_OP_TYPE: tied_function_definition,
                MATMUL_OP_TYPE: _script_definition(MatMulRotate),
                MATMUL_ROWS_OP_TYPE: _script_definition(MatMulRotateRows),
                LINEAR_OP_TYPE: _script_definition(LinearRotate),
                LINEAR_ROWS_OP_TYPE: _script_definition(LinearRotateRows),
                NBITS_OP_TYPE: _script_definition(MatMulNBitsRotate),
                NBITS_ROWS_OP_TYPE: _script_definition(MatMulNBitsRotateRows)}
    for op_type in used:
        if op_type not in builders:
            raise ValueError(f"unknown op {DOMAIN}.{op_type}; road-export defines {', '.join(builders)}")
        function = builders[op_type](opset)
        model.functions[function.identifier()] = function
        for domain, version in function.opset_imports.items():
            if domain:
                model.opset_imports.setdefault(domain, version)
    for key in [k for k in model.functions if k[0] == DOMAIN and k[1] not in used]:
        del model.functions[key]
    if used:
        model.opset_imports[DOMAIN] = VERSION
    return sum(1 for node in model.graph.all_nodes() if node.domain == DOMAIN)


register_schemas()  # onnx's and onnxruntime's shape tools see the road ops once road_export.graph.ops is imported
