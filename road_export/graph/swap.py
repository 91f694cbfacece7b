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

from road_export.graph import ops as road_op
from road_export.core import rotation
from road_export.graph.adapter_files import read_adapter
from road_export.core.errors import RoadError, first_line
from road_export.graph.files import atomic_write
from road_export.core.names import METADATA_SWAP, read_record

METADATA_KEY = METADATA_SWAP
FINGERPRINT_KEY = "road_export.swap_fingerprint"
SUFFIX = ".onnx_adapter"


def parameters(records: dict[str, dict]) -> dict[str, tuple[tuple[int, ...], str]]:
    """The swappable parameters a model's swap records describe: {initializer name: ((width,), numpy dtype)}."""
    return {r[key]: ((int(r["width"]),), str(r["dtype"])) for r in records.values() for key in ("c1", "c2")}


def fingerprint(params: dict[str, tuple[tuple[int, ...], str]]) -> int:
    """A 31-bit fingerprint of parameter names, shapes and dtypes (it fits the adapter file's model_version).

    Equal for a model and every `.onnx_adapter` file made for it (by the export or `road-export adapter --like`);
    another model, another dtype or another set of adapted layers gives another value."""
    import hashlib

    text = json.dumps(sorted((name, list(shape), dtype) for name, (shape, dtype) in params.items()))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "big") & 0x7FFFFFFF


def read_adapter_file(path: str | Path) -> tuple[int, dict[str, tuple[tuple[int, ...], str]]]:
    """(model_version, {parameter: (shape, numpy dtype)}) of an `.onnx_adapter` file; RoadError if unreadable."""
    import onnxruntime as ort

    path = Path(path)
    if not path.is_file():
        raise RoadError(f"{path}: no such adapter file")
    try:
        file = ort.AdapterFormat.read_adapter(str(path))
        values = file.get_parameters()
        params = {name: (tuple(int(d) for d in v.shape()), _NUMPY_DTYPES.get(v.data_type(), v.data_type()))
                  for name, v in values.items()}
        return int(file.get_model_version()), params
    except Exception as e:
        first = first_line(e)
        raise RoadError(f"{path}: not an onnxruntime adapter file, or truncated ({first})") from e


def read_adapter_values(path: str | Path) -> dict[str, np.ndarray]:
    """{parameter: values} of an `.onnx_adapter` file, copied: onnxruntime's values are views of the
    AdapterFormat object's memory, read while it is alive. Raises what onnxruntime raises for an unreadable file."""
    import onnxruntime as ort

    adapter = ort.AdapterFormat.read_adapter(str(path))
    values = {k: np.array(v.numpy(), copy=True) for k, v in adapter.get_parameters().items()}
    del adapter
    return values


_NUMPY_DTYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
                 "tensor(bfloat16)": "bfloat16"}


def check_adapter_file(path: str | Path, records: dict[str, dict], model_name: str) -> int:
    """Refuse an `.onnx_adapter` file whose parameters (names, shapes, dtypes) are not exactly the model's
    swappable ones; returns the file's model_version. Raises RoadError saying what was expected."""
    version, params = read_adapter_file(path)
    expected = parameters(records)
    unknown = sorted(set(params) - set(expected))
    missing = sorted(set(expected) - set(params))
    if unknown or missing:
        raise RoadError(f"{path}: was not made for {model_name}: "
                        + (f"{len(unknown)} parameter(s) it does not take, e.g. {unknown[0]}" if unknown else
                           f"{len(missing)} of its parameters missing, e.g. {missing[0]}")
                        + f"; convert the adapter with road-export adapter DIR --like {model_name} OUT{SUFFIX}")
    for name, (shape, dtype) in sorted(params.items()):
        want_shape, want_dtype = expected[name]
        if dtype != want_dtype:
            raise RoadError(f"{path}: holds {dtype} values ({name}), {model_name} takes {want_dtype}; convert the "
                            f"adapter with road-export adapter DIR --like {model_name} OUT{SUFFIX}")
        if shape != want_shape:
            raise RoadError(f"{path}: {name} has shape {list(shape)}, {model_name} takes {list(want_shape)}")
    return version


def sidecar_candidates(model_path: str | Path) -> dict[str, Path]:
    """The `.onnx_adapter` files beside a model by their names alone, sorted: {adapter name: path} for every
    `<model stem>.<name>.onnx_adapter` with no dot in `name` (so a sibling model's `<model stem>.v2.<name>.onnx_adapter`
    is not one). Nothing is read: `discover` checks their contents."""
    model_path = Path(model_path)
    found: dict[str, Path] = {}
    for file in sorted(model_path.parent.glob(f"{model_path.stem}.*{SUFFIX}")):
        name = file.name[len(model_path.stem) + 1:-len(SUFFIX)]
        if name and "." not in name:
            found[name] = file
    return found


def discover(model_path: str | Path, records: dict[str, dict]) -> dict[str, Path]:
    """The `.onnx_adapter` files beside a model that were made for it: {adapter name: path}.

    A file is taken when it is named `<model stem>.<name>.onnx_adapter` with no dot in `name` (so a sibling
    model's `<model stem>.v2.<name>.onnx_adapter` is not), its fingerprint (model_version) is the model's, and its
    parameters are exactly the model's swappable ones, dtype included. Others are skipped, with a log line."""
    import logging

    model_path = Path(model_path)
    expected = fingerprint(parameters(records))
    found: dict[str, Path] = {}
    for name, file in sidecar_candidates(model_path).items():
        try:
            version = check_adapter_file(file, records, model_path.name)
        except RoadError as e:
            logging.getLogger(__name__).warning("skipping %s", e)
            continue
        if version != expected:
            logging.getLogger(__name__).warning("skipping %s: made for another model (fingerprint %d, %s has %d)",
                                                file, version, model_path.name, expected)
            continue
        found[name] = file
    return found


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
        if c1 is None or c2 is None or c1.name is None:
            continue
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
    model.metadata_props[FINGERPRINT_KEY] = str(fingerprint(parameters(records)))
    return records


def write_adapter_file(path: Path, values: dict[str, np.ndarray]) -> Path:
    """Write an `.onnx_adapter` file (onnxruntime.AdapterFormat), atomically: a temporary file beside `path`,
    renamed at the end and removed on any failure or interruption. Its model_version is the `fingerprint` of the
    parameters, which `discover` checks. Raises RoadError naming `path` when it cannot be written."""
    import onnxruntime as ort

    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(1)
    fmt.set_model_version(fingerprint({k: (tuple(v.shape), str(v.dtype)) for k, v in values.items()}))
    fmt.set_parameters({k: _ort_value(np.ascontiguousarray(v)) for k, v in values.items()})
    with atomic_write(path) as tmp:
        try:
            fmt.export_adapter(str(tmp))
        except Exception as e:  # onnxruntime says only "Failed to open file ... for writing" / "write failed"
            from road_export.graph.checks import write_failure_reason

            first = (str(e).strip().splitlines() or [type(e).__name__])[-1].split(">")[-1].strip()
            raise RoadError(f"{path}: cannot write the adapter file ({write_failure_reason(OSError(first), path)})"
                            ) from e
    return path


def _ort_value(array: np.ndarray):
    """An OrtValue of `array`; bfloat16 (ml_dtypes, which onnxruntime's numpy bridge refuses) through its bits."""
    import onnxruntime as ort

    if array.dtype.name == "bfloat16":
        return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(array.view(np.uint16), onnx.TensorProto.BFLOAT16)
    return ort.OrtValue.ortvalue_from_numpy(array)


def adapter_file_path(model_path: Path, adapter: str) -> Path:
    """Where an export writes adapter `adapter`'s swap file: `<model stem>.<adapter>.onnx_adapter` beside it."""
    return model_path.with_name(f"{model_path.stem}.{adapter}{SUFFIX}")


def swap_records(model_path: Path) -> tuple[dict[str, dict], set[str]]:
    """(layer records, layers lowered to RotateTied) of an exported model."""
    try:
        proto = onnx.load(str(model_path), load_external_data=False)
    except Exception as e:
        raise RoadError(f"{model_path}: not a readable ONNX model ({first_line(e)})") from e
    meta = {p.key: p.value for p in proto.metadata_props}
    if METADATA_KEY not in meta:
        raise RoadError(f"{model_path}: not a swappable model: {_not_swappable(proto, meta)}")
    records = read_record(meta, METADATA_KEY, str(model_path))
    tied_inputs = {n.input[1] for n in proto.graph.node if n.domain == road_op.DOMAIN
                   and n.op_type == road_op.TIED_OP_TYPE}
    tied = {layer for layer, r in records.items() if r["c1"] in tied_inputs}
    return records, tied


def _not_swappable(proto: onnx.ModelProto, meta: dict[str, str]) -> str:
    """Why a model without swap records takes no `.onnx_adapter` file, and what to do instead."""
    from road_export.core.names import METADATA_MODE

    swap = ("export from torch with --mode rotate and one adapter (without --fixed) for a model that swaps "
            "adapters per Run")
    mode = meta.get(METADATA_MODE)
    road = sum(n.domain == road_op.DOMAIN for n in proto.graph.node)
    if mode is None:
        return f"not written by road-export (no swap records); {swap}"
    if mode == "merge":
        return f"its adapter is merged into the weights (mode merge), nothing to swap; {swap}"
    if road == 0:
        return f"its rotations were folded into the weights (no road nodes left), nothing to swap; {swap}"
    if "adapter_ids" in {i.name for i in proto.graph.input}:
        return (f"it holds several adapters picked by adapter_ids, with fixed coefficients; export one adapter to "
                f"swap files for it ({swap})")
    return (f"its {road} road nodes hold fixed coefficients (written by road-export attach, or export --fixed), not "
            f"swappable inputs, so no adapter file fits it; for another adapter attach it to the base again "
            f"(road-export attach BASE.onnx --adapter DIR OUT.onnx), or {swap}")


def packed_values(records: dict[str, dict], adapter, model_name: str) -> dict[str, np.ndarray]:
    """{c1/c2 input name: values} of a peft adapter for a model whose swap records list the peft modules each
    rotation covers ("parts": [[module, offset, width, source offset], ...], written by attach on a model builder
    graph; outputs offset:offset+width of the rotation are the module's source:source+width): the
    parts' coefficients side by side, identity (c1 = 1, c2 = 0) on parts the adapter does not target.

    Raises RoadError for an adapter module on no rotated projection, another group size, or a part the adapter's
    tensors do not fit."""
    config = adapter.config
    where: dict[str, list[tuple[str, int, int, int]]] = {}
    for layer, record in records.items():
        for module, offset, width, *source in record.get("parts", []):
            where.setdefault(module, []).append((layer, int(offset), int(width), int(source[0]) if source else 0))
    extra = sorted(set(adapter.road) - set(where))
    if extra:
        raise RoadError(f"{adapter.path}: does not fit {model_name}: {len(extra)} of its modules are on no rotated "
                        f"projection, e.g. {extra[0]}; attach it to the base graph (road-export attach) so that "
                        "the graph rotates them")
    values: dict[str, np.ndarray] = {}
    for record in records.values():
        width = int(record["width"])
        values[record["c1"]] = np.ones(width, np.float32)
        values[record["c2"]] = np.zeros(width, np.float32)
    for module in sorted(adapter.road):
        theta = adapter.road[module]["road_theta"].astype(np.float32)
        alpha = adapter.road[module]["road_alpha"].astype(np.float32)
        full = sum(width for _, _, width, _ in where[module])
        expected = rotation.params_length(config.variant, full)
        if theta.shape != (expected,):
            raise RoadError(f"{adapter.path}: {module}.road_theta has shape {theta.shape}, expected ({expected},) "
                            f"for {config.variant} on a layer of width {full}")
        c1, c2 = rotation.coefficients(config.variant, config.group_size, theta, alpha)
        for layer, offset, width, source in where[module]:
            record = records[layer]
            if config.group_size != record["group_size"]:
                raise RoadError(f"{adapter.path}: group_size {config.group_size} does not fit {model_name}, "
                                f"attached with group size {record['group_size']} at {layer}")
            if offset % config.group_size or width % config.group_size:
                raise RoadError(f"{adapter.path}: {module} is outputs {offset}:{offset + width} of {layer}, which "
                                f"group size {config.group_size} does not divide (a group would straddle two parts)")
            values[record["c1"]][offset:offset + width] = c1[source:source + width]
            values[record["c2"]][offset:offset + width] = c2[source:source + width]
    return {name: v.astype(records_dtype) for name, v, records_dtype in
            ((r[k], values[r[k]], r["dtype"]) for r in records.values() for k in ("c1", "c2"))}


def convert_adapter(adapter_dir: str | Path, model_path: str | Path, out: str | Path, *,
                    other_files: bool = False) -> Path:
    """A peft RoAd adapter directory -> an `.onnx_adapter` file for `model_path`; refuses what does not fit.

    `other_files=True`: the model is one file of several (an encoder-decoder export), so adapted layers that are not
    in this file are skipped; every layer of the file must still be in the adapter."""
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
    if any("parts" in r for r in records.values()):
        return write_adapter_file(out, packed_values(records, adapter, model_path.name))
    mine, theirs = set(records), set(adapter.road)
    if other_files:
        theirs &= mine
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
