"""The adapter checks beside the outputs: what a file records and holds of its adapters against the reference's.

A quantized file needs them: int4 noise and a small adapter both move the logits' cosine by about 0.01, so a file
exported without its adapter, or with another one, would otherwise pass. `adapter_record_row` compares the
recorded adapters, `coefficient_rows` a swappable (or attached) file's rotation coefficients and those of its
sidecar `.onnx_adapter` files with the reference adapter's (`sidecar_files` finds them); `check_adapter_names`
refuses a mixed-adapter reference without the file's adapter names.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from road_export.core import requires_export  # noqa: F401  (one clear line without the export extra)
from road_export.core.errors import RoadError
from road_export.app.parity.comparisons import OutputParity, failed_row
from road_export.core.names import METADATA_ADAPTERS, METADATA_MODE, METADATA_SWAP, read_record

__all__ = ["COEFFICIENT_TOLERANCE", "adapter_record_row", "check_adapter_names", "coefficient_rows",
           "reference_adapters", "sidecar_files"]


def reference_adapters(model: nn.Module) -> list[tuple[str, int]]:
    """(variant or "?", adapted layer count) of each RoAd adapter of a torch model, sorted: peft's RoadLayer and
    road-export's keep one entry per adapter name in `road_theta`; peft's `peft_config[name].variant` names the
    variant (road-export's own layers: "?", not compared)."""
    counts: dict[str, int] = {}
    for module in model.modules():
        theta = getattr(module, "road_theta", None)
        if isinstance(theta, nn.ParameterDict):
            for name in theta.keys():
                counts[name] = counts.get(name, 0) + 1
    configs = getattr(model, "peft_config", {}) or {}
    return sorted((str(getattr(configs.get(n), "variant", "?")), c) for n, c in counts.items())


def adapter_record_row(meta: dict[str, str], model: nn.Module) -> OutputParity | None:
    """A failed "adapters" row when a road-export file (one with road_export.* metadata) records other adapters
    than the reference carries: their number, each one's variant and adapted layer count (names are not compared,
    the caller may load them under others). None when they agree or the file is not road-export's. Quantized files
    need it: int4 noise and a small adapter both move the logits' cosine by about 0.01, so a file exported without
    its adapter would otherwise pass."""
    if not any(k.startswith("road_export.") for k in meta):
        return None
    try:
        records = json.loads(meta.get("road_export.adapters") or "[]")
        recorded = sorted((str(r.get("variant", "?")), len(r.get("layers", []))) for r in records)
    except (ValueError, AttributeError, TypeError):
        recorded = None
    expected = reference_adapters(model)
    if recorded is not None and len(recorded) == len(expected) and all(
            c == ec and (v == ev or "?" in (v, ev)) for (v, c), (ev, ec) in zip(recorded, expected, strict=True)):
        return None
    say = lambda items: ", ".join(f"{v} on {c} layers" for v, c in items) or "none"  # noqa: E731
    return failed_row("adapters", f"file records {say(recorded) if recorded is not None else 'unreadable'}; "
                      f"reference carries {say(expected)}")


COEFFICIENT_TOLERANCE = {"float32": 1e-5, "float16": 2e-3, "bfloat16": 1e-2}


def coefficient_rows(path: Path, meta: dict[str, str], model: nn.Module, order: tuple[str, ...]) -> list:
    """Rows checking a swappable single-adapter file's rotation coefficients, and those of its sidecar
    `.onnx_adapter` files, against the reference's adapter: for every layer of the file's `road_export.swap`
    record, (c1, c2) computed from the reference module's road_theta / road_alpha by `rotation.coefficients` (peft's
    `_prepare_cols` layout; property-tested against peft) must equal the stored values within
    COEFFICIENT_TOLERANCE of their dtype. Empty for other files. A quantized file needs it: its logits cannot tell
    a small adapter, or another adapter, from int4 noise. peft's RoadLayer and road-export's keep `variant`,
    `group_size`, `road_theta` and `road_alpha` per adapter name; the reference's adapter is its only one, else the
    one of the file's recorded name. An `attach --mode rotate` file (no swap record) is checked the same way
    through its coefficients' names (MODULE.road_c1_NAME), where they are stored whole."""
    from road_export.core import rotation

    if order:
        return []
    adapters = read_record(meta, METADATA_ADAPTERS, str(path), [])
    recorded = [a.get("name") for a in adapters]
    strict = METADATA_SWAP in meta
    if strict:
        records = read_record(meta, METADATA_SWAP, str(path))
    elif len(adapters) == 1 and meta.get(METADATA_MODE) == "rotate":
        # attach's rotations: fixed coefficients named MODULE.road_c1_NAME / road_c2_NAME; those stored in another
        # form (a lowered tied pair) are left out below
        name = adapters[0].get("name", "default")
        records = {layer: {"c1": f"{layer}.road_c1_{name}", "c2": f"{layer}.road_c2_{name}"}
                   for layer in adapters[0].get("layers", [])}
    else:
        return []
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    modules = dict(base.named_modules())
    expected: dict[str, np.ndarray] = {}
    for layer, record in records.items():
        module = modules.get(layer)
        theta = getattr(module, "road_theta", None)
        if not isinstance(theta, nn.ParameterDict) or not len(theta):
            return [failed_row("coefficients", f"the reference has no RoAd adapter on {layer}")]
        name = next(iter(theta.keys())) if len(theta) == 1 else (recorded[0] if recorded else "default")
        if name not in theta:
            return [failed_row("coefficients", f"the reference's adapters on {layer} are {sorted(theta.keys())}, "
                               f"none named {name!r}")]
        with torch.no_grad():
            c1, c2 = rotation.coefficients(module.variant[name], module.group_size[name], theta[name].float(),
                                           module.road_alpha[name].float())
        expected[record["c1"]], expected[record["c2"]] = c1.numpy(), c2.numpy()
    proto = onnx.load(str(path), load_external_data=False)  # only the coefficients' bytes are read below
    stored = {}
    for tensor in proto.graph.initializer:
        if tensor.name in expected:
            if onnx.external_data_helper.uses_external_data(tensor):
                onnx.external_data_helper.load_external_data_for_tensor(tensor, str(path.parent))
            stored[tensor.name] = onnx.numpy_helper.to_array(tensor)
    del proto
    if not strict:
        expected = {k: v for k, v in expected.items() if k in stored and stored[k].size == v.size}
        if not expected:
            return []
    sources = [("file", stored)]
    for sidecar in sidecar_files(path, meta, order).values():
        try:
            from road_export.graph.swap import read_adapter_values

            values = read_adapter_values(sidecar)
        except Exception:  # an unreadable sidecar is a failed row of the sidecar checks already
            continue
        sources.append((sidecar.name, values))
    rows = []
    for label, values in sources:
        worst, dtype, missing = 0.0, "float32", []
        for key, want in expected.items():
            got = values.get(key)
            if got is None or got.size != want.size:
                missing.append(key)
                continue
            dtype = str(got.dtype)
            worst = max(worst, float(np.abs(got.astype(np.float32).ravel() - want.ravel()).max()))
        ok = not missing and worst <= COEFFICIENT_TOLERANCE.get(dtype, 1e-5)
        case = f"{label}: {len(expected) // 2} layers' c1/c2 against the reference adapter's" + \
            (f" ({len(missing)} missing or misshapen, e.g. {missing[0]})" if missing else "")
        rows.append(OutputParity("coefficients", case, [len(expected)], math.inf if missing else worst,
                                 math.inf if missing else worst, 1.0 if ok else 0.0, None, ok))
    return rows


def sidecar_files(path: Path, meta: dict[str, str], order: tuple[str, ...]) -> dict[str, Path]:
    """A swappable single-adapter file's sidecars for its own adapter(s): MODEL.NAME.onnx_adapter beside it, NAME
    among the adapters its metadata records ({name: path}); none for a mixed or fixed file."""
    if order or METADATA_SWAP not in meta:
        return {}
    names = [a["name"] for a in read_record(meta, METADATA_ADAPTERS, str(path), [])]
    found = {n: path.with_name(f"{path.stem}.{n}.onnx_adapter") for n in names if n}
    return {n: p for n, p in found.items() if p.is_file()}


def check_adapter_names(path: Path, order: tuple[str, ...], model: nn.Module) -> None:
    """A mixed-adapter file routes rows by its adapters' names: the reference must hold the same names."""
    if hasattr(model, "peft_config"):
        have = set(model.peft_config)
    else:
        from road_export.export.model import adapter_names

        have = set(adapter_names(model))
    unknown = [n for n in order if n not in have]
    if unknown:
        example = " ".join(f"--adapter {n}=PATH" for n in order)
        raise RoadError(f"{path.name} holds adapters {', '.join(order)}; the --adapter names must match the file's "
                        f"(given: {', '.join(sorted(have)) or 'none'}); pass {example}")
