"""Adapters swapped at run time: `.onnx_adapter` files for onnxruntime's adapter API.

A single-adapter rotate export keeps each road node's C1/C2 as overridable initializers (graph inputs with
defaults) and records, in `road_export.swap`, which initializers belong to which layer. An `.onnx_adapter` file
holds new values for them; `RunOptions.add_active_adapter(LoraAdapter)` applies it for one Run, no reload.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from road_export import ops as road_op
from road_export import rotation
from road_export.adapter_files import read_adapter
from road_export.errors import RoadError
from road_export.files import atomic_write
from road_export.names import METADATA_SWAP

METADATA_KEY = METADATA_SWAP
SUFFIX = ".onnx_adapter"


def make_swappable(model: ir.Model, layer_of: dict[str, str]) -> dict[str, dict]:
    """Turn every road node's C1/C2 initializers into graph inputs; returns {layer: record} for the metadata.

    `layer_of` maps a coefficient initializer name to its layer path.
    """
    records: dict[str, dict] = {}
    inputs = set(model.graph.inputs)
    for node in model.graph.all_nodes():
        if node.domain != road_op.DOMAIN:
            continue
        c1, c2 = node.inputs[1], node.inputs[2]
        layer = layer_of.get(c1.name)
        if layer is None or c1.const_value is None or c2.const_value is None:
            continue
        for value in (c1, c2):
            if value not in inputs:
                model.graph.inputs.append(value)
                inputs.add(value)
        records[layer] = {"c1": c1.name, "c2": c2.name, "group_size": int(node.attributes["group_size"].as_int()),
                          "width": int(c1.const_value.size), "dtype": str(c1.const_value.numpy().dtype)}
    model.metadata_props[METADATA_KEY] = json.dumps(records, sort_keys=True)
    return records


def write_adapter_file(path: Path, values: dict[str, np.ndarray]) -> Path:
    """Write an `.onnx_adapter` file (onnxruntime.AdapterFormat), atomically."""
    import onnxruntime as ort

    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(1)
    fmt.set_model_version(1)
    fmt.set_parameters({k: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v)) for k, v in values.items()})
    with atomic_write(path) as tmp:
        fmt.export_adapter(str(tmp))
    return path


def adapter_file_path(model_path: Path, adapter: str) -> Path:
    """Where an export writes adapter `adapter`'s swap file: `<model stem>.<adapter>.onnx_adapter` beside it."""
    return model_path.with_name(f"{model_path.stem}.{adapter}{SUFFIX}")


def swap_records(model_path: Path) -> tuple[dict[str, dict], set[str]]:
    """(layer records, layers lowered to RotateTied) of an exported model."""
    try:
        proto = onnx.load(str(model_path), load_external_data=False)
    except Exception as e:
        raise RoadError(f"{model_path}: not a readable ONNX model ({str(e).splitlines()[0]})") from e
    meta = {p.key: p.value for p in proto.metadata_props}
    if METADATA_KEY not in meta:
        raise RoadError(f"{model_path}: not a swappable road-export model; export one adapter with --mode rotate")
    records = json.loads(meta[METADATA_KEY])
    tied_inputs = {n.input[1] for n in proto.graph.node if n.domain == road_op.DOMAIN
                   and n.op_type == road_op.TIED_OP_TYPE}
    tied = {layer for layer, r in records.items() if r["c1"] in tied_inputs}
    return records, tied


def convert_adapter(adapter_dir: str | Path, model_path: str | Path, out: str | Path) -> Path:
    """A peft RoAd adapter directory -> an `.onnx_adapter` file for `model_path`; refuses what does not fit."""
    model_path, out = Path(model_path), Path(out)
    if not model_path.is_file():
        raise RoadError(f"{model_path}: no such ONNX file")
    if out.suffix != SUFFIX:
        raise RoadError(f"{out}: the output file name must end in {SUFFIX}")
    if not out.parent.is_dir():
        raise RoadError(f"{out}: directory {out.parent} does not exist")
    records, tied = swap_records(model_path)
    adapter = read_adapter(adapter_dir)
    config = adapter.config
    mine, theirs = set(records), set(adapter.road)
    if mine != theirs:
        missing, extra = sorted(mine - theirs), sorted(theirs - mine)
        raise RoadError(
            f"{adapter.path}: does not fit {model_path.name}: its adapted layers differ"
            + (f"; not in the adapter: {', '.join(missing[:4])}" if missing else "")
            + (f"; not in the model: {', '.join(extra[:4])}" if extra else "")
        )
    values: dict[str, np.ndarray] = {}
    for layer, record in records.items():
        if config.group_size != record["group_size"]:
            raise RoadError(f"{adapter.path}: group_size {config.group_size} does not fit {model_path.name}, "
                            f"exported with group size {record['group_size']} at {layer}")
        theta = adapter.road[layer]["road_theta"].astype(np.float32)
        alpha = adapter.road[layer]["road_alpha"].astype(np.float32)
        expected = rotation.params_length(config.variant, record["width"])
        if theta.shape != (expected,):
            raise RoadError(f"{adapter.path}: {layer}.road_theta has shape {theta.shape}, expected ({expected},) "
                            f"for {config.variant} on a layer of width {record['width']}")
        c1, c2 = rotation.coefficients(config.variant, config.group_size, theta, alpha)
        if layer in tied and config.variant != "road_1":
            halves = [c.reshape(-1, 2, config.group_size // 2) for c in (c1, c2)]
            if not all(np.array_equal(h[:, 0], h[:, 1]) for h in halves):
                raise RoadError(f"{adapter.path}: {config.variant} coefficients cannot replace {layer}, lowered for "
                                "road_1 (RotaryEmbedding); re-export with --target portable to swap any variant")
        values[record["c1"]] = c1.astype(record["dtype"])
        values[record["c2"]] = c2.astype(record["dtype"])
    return write_adapter_file(out, values)
