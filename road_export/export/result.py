"""What an export wrote (`ExportResult`) and the tail every exported file goes through: the swappable layers'
coefficient names, the road node count, the atomic save checked by onnxruntime and the `.onnx_adapter` swap file.

Both the decoder-only exporter (exporter.py) and each part of an encoder-decoder export (seq2seq.py) end here, so
neither imports the other for it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from road_export.graph import ops as road_op
from road_export.export import post, prepare, stream
from road_export.graph.files import save_model

__all__ = ["ExportResult", "road_nodes", "save_and_swap", "swap_values", "swappable_layers", "write_swap_file"]


@dataclass
class ExportResult:
    """What was written: the file(s), the task and I/O names, the road node count and the adapter records
    ({name, variant, group_size, layers[, id]}), the `.data` file if any and one `.onnx_adapter` per adapter of a
    swappable export."""

    path: Path
    mode: str
    task: str | None
    input_names: list[str]
    output_names: list[str]
    road_nodes: int
    adapters: list[dict] = field(default_factory=list)
    external_data: Path | None = None
    adapter_files: list[Path] = field(default_factory=list)


def swappable_layers(record: dict, prefix: str = "model.") -> dict[str, str]:
    """{the traced initializer name of the layer's C1 coefficients: the layer} for one adapter record
    ({name, layers, ...}); `prefix` is where the task module registers the transformers model (`model.`)."""
    c1_name = prepare.buffer_names(record["name"])[0]
    return {f"{prefix}{layer}.{c1_name}": layer for layer in record["layers"]}


def road_nodes(ir_model) -> int:
    """The number of `road` domain nodes in the model's graphs (an onnx_ir.Model)."""
    return sum(1 for node in ir_model.graph.all_nodes() if node.domain == road_op.DOMAIN)


def swap_values(ir_model) -> dict[str, np.ndarray]:
    """{graph input name: a copy of its initializer value}: the swap file's parameters, read before saving (an
    external-data save re-points the tensors, and torch-backed values are views of the model's memory, which the
    caller may free once the weights are written)."""
    return {v.name: np.array(v.const_value.numpy(), copy=True) for v in ir_model.graph.inputs
            if v.const_value is not None}


def write_swap_file(path: Path, adapter: str, values: dict[str, np.ndarray]) -> list[Path]:
    """The `.onnx_adapter` file of `adapter` beside the model at `path` (road_export.swap), as a one-item list."""
    from road_export.graph import swap

    return [swap.write_adapter_file(swap.adapter_file_path(path, adapter), values)]


def save_and_swap(ir_model, path: Path, external_data: bool | None, swap_adapter: str | None = None,
                  on_weights_read: Callable[[], None] | None = None) -> tuple[Path | None, list[Path]]:
    """Save `ir_model` at `path` atomically (road_export.graph.files.save_model), loaded by onnxruntime before it is
    moved into place; `on_weights_read()` runs once the weights are in the written file, before that check; the model's
    initializers are released afterwards (export/stream.py). With `swap_adapter` (a swappable export), that
    adapter's `.onnx_adapter` file is written from the graph inputs' values as they were before saving.
    Returns (the `.data` file or None, the swap files). RoadError when a file cannot be written or loaded."""
    values = swap_values(ir_model) if swap_adapter is not None else {}

    def weights_read_then_check(written: Path) -> None:
        if on_weights_read is not None:
            on_weights_read()
        post.check_loadable(written)

    data = save_model(ir_model, path, external_data, check=weights_read_then_check)
    stream.release_weights(ir_model)
    return data, write_swap_file(path, swap_adapter, values) if swap_adapter is not None else []
