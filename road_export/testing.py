"""For users' own test suites: assert that an ONNX file matches its torch source."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from road_export.verify import ParityReport, verify


def assert_onnx_parity(onnx_path: str | Path, torch_model: nn.Module, **kwargs) -> ParityReport:
    """Run the parity harness (`road_export.verify.verify`); raise AssertionError carrying its table."""
    report = verify(onnx_path, torch_model, **kwargs)
    if not report.passed:
        raise AssertionError("ONNX parity failed\n" + report.table())
    return report
