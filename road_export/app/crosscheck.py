"""`road-export verify --against`: one ONNX file against another, torch-free (road_export.app.parity.file_reference).
This module keeps the name the CLI imports."""

from __future__ import annotations

from road_export.app.parity.file_reference import verify_against_file

__all__ = ["verify_against_file"]
