"""road-export: RoAd-adapted models to ONNX Runtime, merged or as swappable rotations."""

from road_export.adapters import from_peft, load_adapter, read_adapter, save_adapter
from road_export.config import RoadConfig, RoadVariant
from road_export.errors import RoadError
from road_export.export import ExportResult, export
from road_export.layers import RoadLayer
from road_export.model import (
    adapter_ids,
    disable_adapters,
    get_road_model,
    merge_adapter,
    merge_and_unload,
    mixed_batch,
    road_layers,
    set_adapter,
    unload,
    unmerge_adapter,
)

__all__ = [
    "ExportResult", "RoadConfig", "RoadError", "RoadLayer", "RoadVariant", "adapter_ids", "disable_adapters",
    "export", "from_peft", "get_road_model", "load_adapter", "merge_adapter", "merge_and_unload", "mixed_batch",
    "read_adapter", "road_layers", "save_adapter", "set_adapter", "unload", "unmerge_adapter",
]
__version__ = "0.1.0"

