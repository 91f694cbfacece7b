"""What an exported file holds: mode, adapters, road nodes, inputs and outputs, metadata.

`read_facts` is the one read of a file's dtype, metadata and quantization that every other part asks (verify, the
file-against-file check, quantize, inspect, the CLI): one rule each, so a file is judged the same way everywhere.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import onnx

from road_export.core import names
from road_export.core.errors import RoadError

_DTYPES = {v: k.lower() for k, v in onnx.TensorProto.DataType.items()}

# road_export.graph.quantize's record: {"scheme", "bits", "block_size", ...} under the metadata key
# "road_export.quantize" (names.METADATA_QUANTIZE: a file-format key, not the module's path)
METADATA_QUANTIZE = names.METADATA_QUANTIZE
QUANTIZED_OPS = frozenset({"MatMulNBits", "MatMulInteger", "DynamicQuantizeMatMul", "QLinearMatMul",
                           "MatMulIntegerToFloat", "QGemm", "DequantizeLinear", "GatherBlockQuantized"})


@dataclass(frozen=True)
class FileFacts:
    """What the checks read off an ONNX file before running it (`read_facts`), from its protobuf alone.

    `dtype`: "float16" when any graph output is declared float16 (the logits, or a float16 cache beside float32
    logits), else "float32"; always the graph's declared types, never a metadata claim. `metadata`: the
    `metadata_props` as a dict. `quantized_ops`: {op type: count} of the quantized ops (QUANTIZED_OPS) in the main
    graph and its subgraphs (an If branch, a Loop body), as onnx-ir's `Graph.all_nodes` walks them.
    `quantization`: the scheme ("int4", "int8") of road_export.graph.quantize's record where the file has one, else
    the quantized ops counted, most first ("15 MatMulInteger, 1 DequantizeLinear"), None for a float file
    (`quantization_of`). `summary`: the same in one phrase for people (`road-export inspect`, the CLI's "wrote"
    line), with block sizes and how many MatMul weights are quantized."""

    path: str
    dtype: str
    metadata: dict[str, str]
    quantized_ops: dict[str, int]
    quantization: str | None
    summary: str | None


def recorded_scheme(record: str) -> str:
    """The scheme ("int4", "int8") of a `road_export.graph.quantize` metadata record; the record itself when it is not
    the JSON road_export.graph.quantize writes."""
    try:
        return json.loads(record)["scheme"]
    except (ValueError, KeyError, TypeError):
        return record


def quantization_of(metadata: Mapping[str, str], op_counts: Mapping[str, int]) -> str | None:
    """The one quantization rule: the scheme of the `road_export.graph.quantize` record in `metadata`, else the
    quantized op types of `op_counts` ({op type: nodes}) counted, most first; None when neither (a float model). Used on
    a protobuf by `read_facts` and on an onnx-ir model by `road_export.graph.quantize.quantization`."""
    record = metadata.get(METADATA_QUANTIZE)
    if record:
        return recorded_scheme(record)
    counts = Counter({op: n for op, n in op_counts.items() if op in QUANTIZED_OPS and n})
    return ", ".join(f"{n} {op}" for op, n in counts.most_common()) or None


def _all_nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    """The graph's nodes and those of every subgraph (If branches, Loop/Scan bodies), depth first."""
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _all_nodes(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    yield from _all_nodes(sub)


def graph_dtype(model: onnx.ModelProto) -> str:
    """"float16" when any graph output is declared float16, else "float32" (see `FileFacts.dtype`)."""
    float16 = onnx.TensorProto.FLOAT16
    return "float16" if any(o.type.tensor_type.elem_type == float16 for o in model.graph.output) else "float32"


def read_facts(model: onnx.ModelProto | str | Path) -> FileFacts:
    """The `FileFacts` of an ONNX file (`model` a path, read without its external data) or of a loaded protobuf.

    Raises what `onnx.load` raises for an unreadable file; callers that take a user's path check it first
    (`checks.check_onnx_input`)."""
    path = ""
    if not isinstance(model, onnx.ModelProto):
        path = str(model)
        model = onnx.load(path, load_external_data=False)
    meta = {p.key: p.value for p in model.metadata_props}
    ops = Counter(n.op_type for n in _all_nodes(model.graph))
    quantized = {op: n for op, n in ops.most_common() if op in QUANTIZED_OPS}
    return FileFacts(path=path, dtype=graph_dtype(model), metadata=meta, quantized_ops=quantized,
                     quantization=quantization_of(meta, quantized), summary=_summary(model, meta, ops))


@dataclass
class Inspection:
    """What a file holds, from its protobuf alone (weights not loaded): metadata records, I/O, ops and opsets."""

    path: str
    mode: str | None
    task: str | None
    version: str | None
    adapters: list[dict]
    road_nodes: int
    road_functions: list[str]
    inputs: list[dict]
    outputs: list[dict]
    opsets: dict[str, int]
    nodes: int
    op_counts: dict[str, int]
    external_data: bool
    metadata: dict[str, str] = field(default_factory=dict)
    quantization: str | None = None
    folded: bool = False  # exported with road nodes (rotate), none left: folded into the weights since

    def to_json(self) -> str:
        """The inspection as indented JSON (`road-export inspect --json`)."""
        return json.dumps(asdict(self), indent=2)

    def text(self) -> str:
        """The inspection as the lines `road-export inspect` prints."""
        mode = self.mode or "unknown (not written by road-export)"
        if self.folded:
            mode += ", folded: no road nodes left (the rotations are in the weights, e.g. by optimize --fold)"
        lines = [f"{self.path}", f"  mode:      {mode}"]
        if self.task:
            lines.append(f"  task:      {self.task}")
        opsets = ", ".join(f"{domain or 'ai.onnx'} {version}" for domain, version in sorted(self.opsets.items()))
        lines.append(f"  opsets:    {opsets}")
        lines.append(f"  nodes:     {self.nodes}, of which road: {self.road_nodes}"
                     + (f" (functions: {', '.join(self.road_functions)})" if self.road_functions else ""))
        if self.quantization:
            lines.append(f"  quantized: {self.quantization}")
        lines.append(f"  adapters:  {len(self.adapters) or 'none recorded'}")
        if any(i["name"] == "adapter_ids" for i in self.inputs):
            lines.append("  mixed:     adapter_ids picks each row's adapter (0 = base model)")
        for a in self.adapters:
            ident = f"id {a['id']}: " if "id" in a else ""
            lines.append(f"    {ident}{a['name']}: {a['variant']}, group size {a['group_size']}, "
                         f"{len(a['layers'])} layers")
        for title, values in (("inputs", self.inputs), ("outputs", self.outputs)):
            lines.append(f"  {title}:")
            for name, v in _collapse_cache(values):
                lines.append(f"    {name}: {v['dtype']}[{', '.join(map(str, v['shape']))}]")
        extra = {k: v for k, v in self.metadata.items() if not k.startswith("road_export.")}
        if extra:
            lines.append("  metadata:  " + ", ".join(f"{k}={v}" for k, v in extra.items()))
        if self.external_data:
            lines.append("  weights:   external data file")
        return "\n".join(lines)


def _collapse_cache(values: list[dict]) -> list[tuple[str, dict]]:
    """One line for all layers' past/present keys (or values) of one dtype and shape: `present.0..3.key`."""
    out: list[tuple[str | tuple, dict]] = []
    groups: dict[tuple, list[int]] = {}
    for v in values:
        match = re.fullmatch(r"(past_key_values|present)\.(\d+)\.(key|value)", v["name"])
        if not match:
            out.append((v["name"], v))
            continue
        key = (match[1], match[3], v["dtype"], tuple(v["shape"]))
        if key not in groups:
            groups[key] = []
            out.append((key, v))
        groups[key].append(int(match[2]))
    return [(name if isinstance(name, str) else
             f"{name[0]}.{min(groups[name])}..{max(groups[name])}.{name[1]}" if len(groups[name]) > 1 else
             f"{name[0]}.{groups[name][0]}.{name[1]}", v) for name, v in out]


def _value_info(v: onnx.ValueInfoProto) -> dict:
    t = v.type.tensor_type
    shape = [d.dim_param or (d.dim_value if d.HasField("dim_value") else "?") for d in t.shape.dim]
    return {"name": v.name, "dtype": _DTYPES.get(t.elem_type, str(t.elem_type)), "shape": shape}


def inspect_model(path: str | Path) -> Inspection:
    """Inspect the ONNX file at `path` without loading its external data (which must be there).

    Raises RoadError for a missing, empty, truncated or non-ONNX file (see `checks.check_onnx_input`).
    """
    from road_export.graph.checks import check_onnx_input

    path = Path(path)
    model = check_onnx_input(path)
    meta = {p.key: p.value for p in model.metadata_props}
    adapters = names.read_record(meta, names.METADATA_ADAPTERS, str(path), [])
    nodes = list(model.graph.node)
    external = any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
    initializers = {t.name for t in model.graph.initializer}
    return Inspection(
        path=str(path),
        mode=meta.get(names.METADATA_MODE),
        task=meta.get("road_export.task"),
        version=meta.get("road_export.version"),
        adapters=adapters,
        road_nodes=sum(n.domain == "road" for n in nodes),
        road_functions=[f.name for f in model.functions if f.domain == "road"],
        inputs=[_value_info(v) for v in model.graph.input if v.name not in initializers],
        outputs=[_value_info(v) for v in model.graph.output],
        opsets={o.domain: o.version for o in model.opset_import},
        nodes=len(nodes),
        op_counts=dict(Counter(f"{n.domain + '.' if n.domain else ''}{n.op_type}" for n in nodes).most_common()),
        external_data=external,
        metadata=meta,
        quantization=read_facts(model).summary,
        folded=(meta.get(names.METADATA_MODE) == "rotate" and any(a.get("layers") for a in adapters
                                                                   if isinstance(a, dict))
                and not any(n.domain == "road" for n in nodes)),
    )


def quantization_summary(model: onnx.ModelProto | str | Path) -> str | None:
    """How a file's weights are quantized, in one phrase, or None for a float file (`read_facts(model).summary`):
    from road-export's `road_export.graph.quantize` record, e.g. "int4 (MatMulNBits, blocks of 16; 5 of them int8 in
    blocks of 32: layers 0-1 and the output head; 15 of 15 MatMul weights)", else the quantized op types another
    tool wrote. `model`: the protobuf, or a path (read without its external data)."""
    return read_facts(model).summary


def _summary(model: onnx.ModelProto, meta: dict[str, str], ops: Counter) -> str | None:
    """`FileFacts.summary` from the protobuf, its metadata and its op counts (subgraphs included)."""
    record = meta.get(METADATA_QUANTIZE)
    if record:
        try:
            info = json.loads(record)
            scheme, block = info["scheme"], info["block_size"]
            eights, first = int(info.get("int8_nodes") or 0), int(info.get("int8_layers") or 0)
        except (ValueError, KeyError, TypeError, OverflowError):
            return f"{record} (an unreadable road_export.graph.quantize record)"
        initializers = {t.name for t in model.graph.initializer}
        float_matmuls = sum(1 for n in model.graph.node if n.op_type == "MatMul" and len(n.input) == 2
                            and n.input[1] in initializers)
        quantized = ops.get("MatMulNBits", 0)
        parts = [f"MatMulNBits, blocks of {block}"]
        if eights:
            where = (f"layer{'s 0-' + str(first - 1) if first > 1 else ' 0'} and the output head" if first else
                     "the output head")
            parts.append(f"{eights} of them int8 in blocks of {info.get('int8_block_size', 32)}: {where}")
        parts.append(f"{quantized} of {quantized + float_matmuls} MatMul weights")
        return f"{scheme} ({'; '.join(parts)})"
    found = [op for op in ops if op in QUANTIZED_OPS]
    if not found:
        return None
    return f"{', '.join(f'{ops[op]} {op}' for op in found)} (not recorded by road-export)"


def _dims(value: onnx.ValueInfoProto) -> list[int | str]:
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in value.type.tensor_type.shape.dim]


def check_fits(model: onnx.ModelProto, config, path: str | Path, hint: str) -> None:
    """Refuse an ONNX model whose fixed sizes differ from a transformers `config`'s.

    Compares `logits`' last axis with `vocab_size` (rank 3) or `num_labels` (rank 2), `last_hidden_state`'s with
    `hidden_size`, and the `past_key_values.*` inputs with `num_hidden_layers`, the key/value heads and the head
    size. Symbolic axes are not judged. Raises RoadError naming `path`, the first mismatch, then `hint`.
    """
    outputs = {o.name: _dims(o) for o in model.graph.output}
    inputs = {i.name: _dims(i) for i in model.graph.input}
    problems = []
    get = lambda name: getattr(config, name, None)  # noqa: E731
    logits = outputs.get("logits")
    if logits and isinstance(logits[-1], int) and logits[-1] > 0:
        size, expected = ("vocab_size", get("vocab_size")) if len(logits) == 3 else ("num_labels", get("num_labels"))
        if isinstance(expected, int) and logits[-1] != expected:
            problems.append(f"its logits have {logits[-1]} entries, the source model's {size} is {expected}")
    hidden = outputs.get("last_hidden_state")
    if hidden and isinstance(hidden[-1], int) and isinstance(get("hidden_size"), int) \
            and hidden[-1] != get("hidden_size"):
        problems.append(f"its last_hidden_state has width {hidden[-1]}, the source model's hidden_size is "
                        f"{get('hidden_size')}")
    past = {n: d for n, d in inputs.items() if n.startswith("past_key_values.")}
    layers = get("num_hidden_layers")
    if past and isinstance(layers, int) and len(past) != 2 * layers:
        problems.append(f"it takes {len(past)} past_key_values inputs, the source model has {layers} layers "
                        f"({2 * layers} inputs)")
    heads = get("num_key_value_heads") or get("num_attention_heads")
    hidden_size, attention_heads = get("hidden_size"), get("num_attention_heads")
    head_dim = get("head_dim") or (hidden_size // attention_heads
                                   if isinstance(hidden_size, int) and isinstance(attention_heads, int) else None)
    for name, dims in past.items():
        # a symbolic head size (the model builder's `kv_cache_dim`) is the attention's to check, not the shape's
        width = dims[3] if len(dims) == 4 and isinstance(dims[3], int) else head_dim
        if len(dims) == 4 and isinstance(dims[1], int) and isinstance(heads, int) and isinstance(head_dim, int) \
                and (dims[1], width) != (heads, head_dim):
            problems.append(f"its {name} has {dims[1]} heads of size {dims[3]}, the source model's are {heads} of "
                            f"size {head_dim}")
            break
    if problems:
        kind = get("model_type") or type(config).__name__
        raise RoadError(f"{path}: does not fit the source model ({kind}): {problems[0]}; {hint}")
