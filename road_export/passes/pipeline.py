"""The passes in order, as one `ir.passes.Sequential`:

    unlower -> fold_constants -> fuse -> compose -> [freeze_swappable -> fold] -> lower -> attention

unlower first, so that an already lowered file's `road.RotateTied` nodes match compose and fold; fold_constants
before fuse, so that coefficients computed from road_theta/road_alpha are constants; fuse next, so that rotations
exported by others become road nodes; compose before fold, so that a chain folds once; lower last, on whatever
road nodes remain; attention (the exported attention's key transposes and grouped-query repeats, standard ops
only) touches no road node and runs on any decoder. Each pass returns its own result (`FuseResult.fused`,
`ComposeResult.composed`, ...); `Pipeline` keeps them in order and `report` turns them into a `PipelineReport`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import onnx_ir as ir

from road_export.core.errors import RoadError
from road_export.graph.files import load_for_rewrite, save_model
from road_export.passes.attention import AttentionPass, AttentionResult
from road_export.passes.common import road_nodes
from road_export.passes.compose import ComposePass, ComposeResult
from road_export.passes.fold import FoldPass, FoldResult, FreezeSwappablePass
from road_export.passes.fold_constants import FoldConstantsPass
from road_export.passes.fuse import FusePass, FuseResult
from road_export.passes.lower import TARGETS, LowerPass, LowerResult, UnlowerPass

__all__ = ["Pipeline", "PipelineReport", "PipelineResult", "StepReport", "optimize_file", "passes", "run"]


@dataclasses.dataclass
class PipelineResult(ir.passes.PassResult):
    """The sequence's result plus every pass's own result, in order: (pass, result) pairs."""

    steps: list[tuple[ir.passes.PassBase, ir.passes.PassResult]] = dataclasses.field(default_factory=list)


class Pipeline(ir.passes.Sequential):
    """`ir.passes.Sequential` that keeps each pass's result (the counts live there) instead of only the last."""

    def call(self, model: ir.Model) -> PipelineResult:
        steps = []
        modified = False
        for pass_ in self.passes:
            result = pass_(model)  # errors propagate as raised: a RoadError stays one line for the CLI
            steps.append((pass_, result))
            model, modified = result.model, modified or result.modified
        return PipelineResult(model, modified=modified, steps=steps)


def passes(*, fold: bool = False, target: str = "onnxruntime", debug: bool = False) -> Pipeline:
    """The pipeline for these options. RoadError for an unknown target (one of TARGETS)."""
    if target not in TARGETS:
        raise RoadError(f"unknown target {target!r}; choose {' or '.join(TARGETS)}")
    steps: list[ir.passes.PassBase] = [UnlowerPass(), FoldConstantsPass(), FusePass(debug=debug), ComposePass()]
    if fold:
        steps += [FreezeSwappablePass(), FoldPass()]
    steps += [LowerPass(target), AttentionPass(debug=debug)]
    return Pipeline(*steps)


@dataclass
class StepReport:
    """One pass in words: its name, how many things it changed, and what."""

    name: str
    changed: int
    what: str


@dataclass
class PipelineReport:
    """What the pipeline did to a model: per-pass counts, node counts before and after, why fusion did not fire."""

    steps: list[StepReport] = field(default_factory=list)
    nodes_before: int = 0
    nodes_after: int = 0
    road_before: int = 0
    road_after: int = 0
    not_fired: list[str] = field(default_factory=list)

    def step(self, name: str) -> StepReport:
        """The step called `name` (fuse, compose, fold, lower); KeyError if it did not run."""
        for s in self.steps:
            if s.name == name:
                return s
        raise KeyError(name)

    def text(self) -> str:
        """One line per pass, node counts, and why fusion did not fire (`road-export optimize` prints it)."""
        lines = [f"{s.name:>8}: {s.what}" for s in self.steps]
        lines.append(f"   nodes: {self.nodes_before} -> {self.nodes_after}; road nodes: {self.road_before} -> "
                     f"{self.road_after}")
        lines += [f"  not fused: {reason}" for reason in self.not_fired]
        return "\n".join(lines)


def _describe(result: ir.passes.PassResult, target: str) -> StepReport | None:
    if isinstance(result, FuseResult):
        return StepReport("fuse", result.fused, f"{result.fused} decomposed rotation(s) -> road")
    if isinstance(result, ComposeResult):
        return StepReport("compose", result.composed, f"{result.composed} pair(s) of rotations composed")
    if isinstance(result, FoldResult):
        return StepReport("fold", result.folded, f"{result.folded} rotation(s) folded into weights")
    if isinstance(result, AttentionResult):
        return StepReport("attention", result.swapped + result.grouped, f"{result.swapped} key transpose(s) made "
                          f"one Transpose, {result.grouped} grouped-query product(s) without the repeat")
    if isinstance(result, LowerResult):
        return StepReport("lower", result.changed, f"{result.tied} tied (RotaryEmbedding), {result.generic} "
                          f"generic, for {target}")
    return None  # unlower, fold_constants, freeze_swappable: preparation, not reported


def run(model: ir.Model, *, fold: bool = False, target: str = "onnxruntime", debug: bool = False) -> PipelineReport:
    """Run the passes on `model` in place and report what each did (RoadError for an unknown target)."""
    pipeline = passes(fold=fold, target=target, debug=debug)
    report = PipelineReport(nodes_before=len(list(model.graph.all_nodes())),
                            road_before=len(road_nodes(model.graph)))
    result = pipeline(model)
    for _, step in result.steps:
        described = _describe(step, target)
        if described is not None:
            report.steps.append(described)
        if isinstance(step, FuseResult):
            report.not_fired = step.not_fired + report.not_fired
        if isinstance(step, AttentionResult):
            report.not_fired += [f"(attention) {line}" for line in step.not_fired]
    report.nodes_after = len(list(model.graph.all_nodes()))
    report.road_after = len(road_nodes(model.graph))
    return report


def optimize_file(source: str | Path, target_path: str | Path, quantize: str | None = None,
                  **kwargs) -> PipelineReport:
    """`road-export optimize`: load an ONNX file, run the passes, save atomically (external data kept external).

    Weights stream: those the passes do not change are copied from the source's `.data`, folded ones are
    computed one at a time as they are written (fold.py). `quantize` ("int4"/"int8") quantizes the MatMul weights
    afterwards (road_export.graph.quantize; this step holds the model in memory). kwargs as for `run`. RoadError for a
    missing/unreadable source, an output path that cannot be written, or a quantize option on a quantized file.
    """
    model, external = load_for_rewrite(source, target_path)
    if quantize is not None:
        from road_export.graph import quantize as quant

        quant.check_scheme(quantize)
        already = quant.quantization(model)
        if already is not None:
            raise RoadError(f"{source}: is quantized already ({already}); --quantize takes a float model")
    report = run(model, **kwargs)
    if quantize is not None:
        model, _ = quant.quantize_model(model, quantize, where=str(source))
    save_model(model, Path(target_path), external)
    return report
