"""For users' own test suites: assert that an ONNX file matches its torch source, or peft's own model."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from road_export.app.verify import ParityReport, verify


def assert_onnx_parity(onnx_path: str | Path, torch_model: nn.Module, **kwargs) -> ParityReport:
    """Run the parity harness (`road_export.app.verify.verify`); raise AssertionError carrying its table."""
    report = verify(onnx_path, torch_model, **kwargs)
    if not report.passed:
        raise AssertionError("ONNX parity failed\n" + report.table())
    return report


def assert_peft_parity(onnx_path: str | Path, base: str | Path, adapters: list[str], *, task: str | None = None,
                       **kwargs) -> ParityReport:
    """Parity of the file against the model peft itself loads from `base` and the adapter directories
    (`road_export.export.source.load_reference`): independent of road-export's loading. Raises AssertionError carrying
    the table when parity fails, RoadError for input peft cannot load."""
    from road_export.export.source import PEFT_REFERENCE, load_reference

    return assert_onnx_parity(onnx_path, load_reference(base, adapters, task=task), task=task,
                              reference=PEFT_REFERENCE, **kwargs)
