"""The passes in order, each reporting what it changed: fuse -> compose -> fold (optional) -> lower.

fuse first, so that rotations exported by others become road nodes; compose before fold, so that a chain folds
once; lower last, on whatever road nodes remain.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import onnx_ir as ir

from road_export.errors import RoadError
from road_export.export import op as road_op
from road_export.passes.common import road_nodes
from road_export.passes.compose import ComposePass
from road_export.passes.fold import FoldPass
from road_export.passes.fuse import FusePass
from road_export.passes.lower import TARGETS, LowerPass


@dataclass
class StepReport:
    name: str
    changed: int
    what: str


@dataclass
class PipelineReport:
    steps: list[StepReport] = field(default_factory=list)
    nodes_before: int = 0
    nodes_after: int = 0
    road_before: int = 0
    road_after: int = 0
    not_fired: list[str] = field(default_factory=list)

    def text(self) -> str:
        lines = [f"{s.name:>8}: {s.what}" for s in self.steps]
        lines.append(f"   nodes: {self.nodes_before} -> {self.nodes_after}; road nodes: {self.road_before} -> "
                     f"{self.road_after}")
        lines += [f"  not fused: {reason}" for reason in self.not_fired]
        return "\n".join(lines)


def run(model: ir.Model, *, fold: bool = False, target: str = "onnxruntime", debug: bool = False) -> PipelineReport:
    """Run the passes on `model` in place."""
    if target not in TARGETS:
        raise RoadError(f"unknown target {target!r}; choose {' or '.join(TARGETS)}")
    report = PipelineReport(nodes_before=len(list(model.graph.all_nodes())),
                            road_before=len(road_nodes(model.graph)))
    for node in road_nodes(model.graph):  # an already lowered file: compose and fold match road.Rotate
        node.op_type = road_op.OP_TYPE
    fuse = FusePass(debug=debug)
    fuse(model)
    report.steps.append(StepReport("fuse", fuse.report.fused, f"{fuse.report.fused} decomposed rotation(s) -> road"))
    report.not_fired = fuse.report.not_fired
    compose = ComposePass()
    compose(model)
    report.steps.append(StepReport("compose", compose.composed, f"{compose.composed} pair(s) of rotations composed"))
    if fold:
        _freeze_swappable(model)
        folder = FoldPass()
        folder(model)
        report.steps.append(StepReport("fold", folder.folded, f"{folder.folded} rotation(s) folded into weights"))
    lower = LowerPass(target)
    lower(model)
    tied = sum(n.op_type == "RotateTied" for n in road_nodes(model.graph))
    report.steps.append(StepReport("lower", lower.changed, f"{tied} tied (RotaryEmbedding), "
                                   f"{len(road_nodes(model.graph)) - tied} generic, for {target}"))
    report.nodes_after = len(list(model.graph.all_nodes()))
    report.road_after = len(road_nodes(model.graph))
    return report


def _freeze_swappable(model: ir.Model) -> None:
    """Folding makes the adapter permanent: road coefficients stop being overridable graph inputs."""
    coefficients = {v for n in road_nodes(model.graph) for v in n.inputs[1:3] if v is not None}
    keep = [v for v in model.graph.inputs if not (v in coefficients and v.const_value is not None)]
    if len(keep) != len(model.graph.inputs):
        model.graph.inputs.clear()
        model.graph.inputs.extend(keep)
        model.metadata_props.pop("road_export.swap", None)


def optimize_file(source: str | Path, target_path: str | Path, **kwargs) -> PipelineReport:
    """Load an ONNX file, run the passes, save atomically (external data kept external)."""
    from road_export.export.exporter import _save_atomic, load_for_rewrite

    model, external = load_for_rewrite(source, target_path)
    report = run(model, **kwargs)
    _save_atomic(model, Path(target_path), external)
    return report
