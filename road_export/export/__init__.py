"""ONNX export: the `road` op, tasks, and the exporter."""

from road_export.export.exporter import ExportResult, export

__all__ = ["ExportResult", "export"]
