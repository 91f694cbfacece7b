"""The torch reference: onnxruntime against peft's model (or road-export's own) on the planned cases, per output.

Unlike a single-shape check that only warns, this runs batch 1 and > 1, sequence 1 and longer, attention
masks with left padding, and fails for real. Padded positions are left out of the comparison: their values
are undefined in both runtimes.

The reference is fed exactly the inputs the file is fed (a client's inputs: `position_ids` from the attention
mask as transformers' generate derives them, where the file takes them), and the report names it: "peft" for the
model peft itself loads (see road_export.export.source), "road-export loader" for road-export's own model.
The cases come from road_export.app.parity.cases, the rows from road_export.app.parity.comparisons, the file's dtype,
metadata and quantization from `road_export.graph.inspection.read_facts`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
from road_export.core import requires_export  # noqa: F401  (one clear line without the export extra)
import torch
from torch import nn

from road_export.core.errors import RoadError, first_line
from road_export.export.tasks import TaskModule, infer_task, nest, normalize_task, sample_inputs, task_spec
from road_export.graph.inspection import read_facts
from road_export.graph import ort_session
from road_export.core.names import PAST
from road_export.app.parity import cases
from road_export.app.parity.adapter_checks import (adapter_record_row, check_adapter_names, coefficient_rows,
                                               sidecar_files)
from road_export.app.parity.cases import (CACHE_SHAPES, DEFAULT_SHAPES, MIXED_SHAPES, SWEEP_ROW, as_cases, case_label,
                                      check_task_fits, plan_gqa, special_ids, sweep_ids, sweep_runs)
from road_export.app.parity.comparisons import (TOLERANCE, OutputParity, compare, compare_present, failed_row,
                                                merge_rows,
                                            skipped_row)
from road_export.app.parity.feeds import cast_feeds, declared_types, round_as_fed
from road_export.app.parity.memory import lend_equal_weights, release_freed_memory
from road_export.app.parity.report import ParityReport
from road_export.core.names import METADATA_SWAP, read_record, recorded_adapter_names

__all__ = ["TorchParity", "verify"]


def verify(
    onnx_path: str | Path,
    torch_model: nn.Module,
    *,
    task: str | None = None,
    shapes: tuple[tuple[int, ...], ...] = DEFAULT_SHAPES,
    atol: float | None = None,
    seed: int = 0,
    session_options=None,
    native: bool | None = None,
    reference: str | None = None,
    coverage: bool = True,
) -> ParityReport:
    """Compare the ONNX file with `torch_model` (float32 reference) on each shape in `shapes`.

    `torch_model` is road-export's model or a peft model (`PeftModel`; a mixed-adapter file's rows then go through
    peft's `adapter_names`). `reference` names it in the report (default: "peft" for a peft model, else
    "road-export loader"). A shape is (batch, sequence, padding), or (batch, sequence, past length, padding) for a
    graph with a cache; the defaults (`cases.DEFAULT_SHAPES`) become `cases.CACHE_SHAPES` for a graph with a cache
    and `cases.MIXED_SHAPES` for a mixed-adapter file. `native` says how road ops run: the native kernels (True),
    their standard-op bodies (False), or the kernels where they build (None), as `RoadSession` does; the report
    records which. `atol` defaults by the file's dtype (`inspection.read_facts`: its declared outputs).
    With `coverage` (default) two more checks run: a vocabulary sweep and a long sequence (see road_export.app.parity.
    cases); the report records the ids covered and the longest sequence. A decoder with a cache also generates
    across the lengths where the model changes (road_export.app.parity.crossing). A swappable single-adapter
    export's sidecar `MODEL.NAME.onnx_adapter` of its own adapter is checked too: the shapes again with it active
    (an unreadable one is a failed row).
    Raises RoadError for a missing or unloadable file, or a file whose inputs the task does not have.
    """
    harness = TorchParity(onnx_path, torch_model, task=task, atol=atol, seed=seed, session_options=session_options,
                          native=native, reference=reference)
    return harness.run(shapes, coverage=coverage)


def open_file_session(path: Path, model: nn.Module, session_options, native: bool | None) -> tuple:
    """(onnxruntime CPU session, how road ops run: "native"/"bodies"/"-", OrtValues lent to it that must outlive
    it). Without `session_options`: errors only (a failure comes back as one line), and for a file with an
    external `.data` file the reference's equal weights lent and no prepacking or arena (one mapping of the
    weights beside the reference, see road_export.app.parity.memory). Raises RoadError when onnxruntime cannot load it.
    """
    lent: list = []  # OrtValues over the reference's memory given to the session: they live as long as it does
    if session_options is None:
        # fatal only: swappable coefficients make onnxruntime warn (not a parity matter), and a failure comes back
        # as one line, not also as onnxruntime's coloured error log (severity 3 still prints errors)
        large = path.with_name(path.name + ".data").is_file()
        # a large model: onnxruntime maps the aligned `.data` file instead of copying prepacked weights, so
        # verify holds the torch reference and one mapping of the weights, not the weights twice more
        session_options = ort_session.session_options(
            log_severity=4, session_config={"session.disable_prepacking": "1"} if large else None)
        if large:
            # activations allocated per run and freed after it, not kept by onnxruntime's arena at their largest
            # (the long sequence's) while the outputs are compared
            session_options.enable_cpu_mem_arena = False
            lent.extend(lend_equal_weights(path, model, session_options))
    opened = ort_session.new_session(path, native=native, options=session_options)
    kernels = ("native" if opened.native else "bodies") if opened.road else "-"
    return opened.session, kernels, lent


class TorchParity:
    """One ONNX file against one torch reference: the file's session, the task's spec, the report being filled.

    Built in the order the checks refuse a file: the file (missing, unloadable), the task (from `task`, the file's
    `road_export.task` metadata or the model) against the file's inputs and outputs, a mixed-adapter file's adapter
    names against the reference's. `run` then fills the report case by case."""

    def __init__(self, onnx_path: str | Path, torch_model: nn.Module, *, task: str | None = None,
                 atol: float | None = None, seed: int = 0, session_options=None, native: bool | None = None,
                 reference: str | None = None) -> None:
        self.path = Path(onnx_path)
        if not self.path.is_file():
            raise RoadError(f"{self.path}: no such ONNX file")
        self.model, self.seed = torch_model, seed
        self.session, kernels, self._lent = open_file_session(self.path, torch_model, session_options, native)
        facts = read_facts(self.path)
        self.meta, self.quantized = facts.metadata, facts.quantization
        self.dtype = facts.dtype
        self.atol = TOLERANCE[self.dtype] if atol is None else atol
        self.spec, self.order = self._task_spec(task)
        self.feeds_needed = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.declared = declared_types(self.session)
        self.ref_module = TaskModule(torch_model, self.spec).eval()
        if reference is None:
            reference = "peft" if hasattr(torch_model, "peft_config") else "road-export loader"
        self.report = ParityReport(str(self.path), self.dtype, self.atol, kernels=kernels, reference=reference,
                                   quantized=self.quantized)
        self.vocab = int(getattr(torch_model.config, "vocab_size", 0) or 0)
        self.seen: set[int] = set()  # token ids fed on unpadded positions (the report's ids_covered)
        self.gqa = False  # a model builder graph (GroupQueryAttention): right padding, see `cases.plan_gqa`
        names = self.spec.output_names
        self.spec_order = [self.output_names.index(n) for n in names] \
            if sorted(names) == sorted(self.output_names) else list(range(len(self.output_names)))

    def _task_spec(self, task: str | None):
        """(the task's `TaskSpec` fed what the file takes, a mixed-adapter file's adapter names by id); RoadError
        when the task does not fit the file or the reference lacks the file's adapter names."""
        path, meta = self.path, self.meta
        told = "--task" if task else "its road_export.task metadata" if meta.get("road_export.task") else "the model"
        task = task or meta.get("road_export.task") or infer_task(self.model)
        file_inputs = [i.name for i in self.session.get_inputs()]
        output_names = [o.name for o in self.session.get_outputs()]
        order: tuple[str, ...] = ()
        if "adapter_ids" in file_inputs:
            order = tuple(recorded_adapter_names(meta, str(path)))
            check_adapter_names(path, order, self.model)
        if told == "the model" and normalize_task(task) == "text-generation" and any(n.startswith(PAST)
                                                                                     for n in file_inputs):
            task = "text-generation-with-past"  # a file that records no task (a model builder graph) but has a cache
        check_task_fits(path, normalize_task(task), told, file_inputs, output_names)
        # whether positions are fed is the file's to say; asking the model would run it, paging its weights in
        # before the file's own runs (see `run`)
        spec = task_spec(self.model, task, order, positions="position_ids" in file_inputs)
        # the reference gets what the file gets: positions where the file takes them (an older file may not)
        names = [n for n in spec.input_names if n in file_inputs or n != "position_ids"]
        if "position_ids" in file_inputs and "position_ids" not in names:
            names.insert(2, "position_ids")
        spec = dataclasses.replace(spec, input_names=tuple(names))
        missing = [n for n in file_inputs if n not in spec.input_names]
        if missing:
            raise RoadError(f"{path}: inputs {missing} are not inputs of task {spec.task}")
        return spec, order

    def run(self, shapes: tuple[tuple[int, ...], ...] = DEFAULT_SHAPES, coverage: bool = True) -> ParityReport:
        """Every check, in the report's order: adapter records (a quantized file), the shapes, the skipped cases,
        the vocabulary sweep and the long sequence (`coverage`), generation across thresholds (a decoder with a
        cache, one adapter), the shapes again with each sidecar adapter active."""
        report, spec = self.report, self.spec
        if self.quantized:  # cosine cannot tell a small adapter from quantization error: the file must record it,
            # and a swappable file's coefficients (and its sidecars') must be the reference adapter's
            row = adapter_record_row(self.meta, self.model)
            if row is not None:
                report.rows.append(row)
            report.rows.extend(coefficient_rows(self.path, self.meta, self.model, self.order))
        if spec.cache and shapes == DEFAULT_SHAPES:
            shapes = CACHE_SHAPES
        elif self.order and shapes == DEFAULT_SHAPES:
            shapes = MIXED_SHAPES
        planned = as_cases(shapes)
        skipped: list[OutputParity] = []
        if spec.cache:
            from road_export.runtime.kvcache import file_layout

            layout = file_layout(self.path, self.session)
            self.gqa = layout is not None and layout.gqa
        if self.gqa:
            planned, skipped = plan_gqa(planned, self.output_names[0])
        fixed = [(case_label(*case, spec.cache), *case) for case in planned]
        longest = cases.max_positions(self.model) if coverage and self.vocab > 0 else 0
        if longest:
            fixed.append((f"long sequence: seq {longest}", 1, longest, 0, 0))
        fixed_rows, long_skipped = self._run_fixed(fixed, longest)
        for rows in fixed_rows[:len(planned)]:
            report.rows.extend(rows)
        report.rows.extend(skipped)
        if coverage and self.vocab > 0:
            report.rows.extend(self._sweep(min(SWEEP_ROW, longest or SWEEP_ROW)))
            report.rows.extend([long_skipped] if long_skipped else fixed_rows[-1])  # the long sequence
        if spec.cache and not self.order:  # generation across the lengths where the model changes
            from road_export.app.parity.crossing import crossing_rows

            report.rows.extend(crossing_rows(self.path, self.session, self.model, atol=self.atol,
                                             by_cosine=bool(self.quantized),
                                             exact=self.dtype == "float32" and not self.quantized, seed=self.seed))
        if self.vocab > 0:
            report.ids_covered = f"{len(self.seen)}/{self.vocab}"
        report.rows.extend(self._sidecar_rows(planned))
        return report

    def _run_fixed(self, fixed: list[tuple], longest: int) -> tuple[list[list[OutputParity]], OutputParity | None]:
        """The rows of the fixed cases (the shapes, then the long sequence when `longest`), and the long sequence's
        skipped row when the reference cannot run it either (then it has no rows).

        The file runs them all first, before the reference's weights are touched (they are mapped from the
        checkpoint and paged in as they are used): onnxruntime's activations for the long sequence, the largest of
        verify, come and go while one model's weights are resident, not two. Its outputs are kept for the
        comparison."""
        ran = []
        long_skipped = None
        for index, (case, batch, seq, past, pad) in enumerate(fixed):
            inputs = self._prepare(batch, seq, past, pad)
            try:
                ran.append((inputs, self._run_file(inputs)))
            except Exception:
                if not longest or index != len(fixed) - 1:
                    raise
                # the long sequence, built from the model's config: when the reference cannot run it either, the
                # check cannot be built for this model (say so in the table); when it runs it, the file is wrong
                reason = self._reference_refuses(inputs)
                if reason is None:
                    raise
                long_skipped = skipped_row(self.output_names[0], case,
                                           f"the reference cannot run it either: {reason}")
                fixed = fixed[:-1]
        rows = [self._check(*case, ran=outputs) for case, outputs in zip(fixed, ran, strict=True)]
        return rows, long_skipped

    def _sweep(self, row: int) -> list[OutputParity]:
        """The vocabulary sweep (`cases.sweep_ids` in rows of `row` tokens): one merged row per output."""
        ids = sweep_ids(self.vocab, special_ids(self.model.config), self.seed)
        parts = [self._check("vocabulary sweep", len(chunk), row, 0, 0, chunk)
                 for _, chunk in sweep_runs(ids, row, self.vocab)]
        swept = len(set(ids.tolist()))
        return [merge_rows([p[i] for p in parts], f"vocabulary sweep: {swept} ids, {row} per row")
                for i in range(len(parts[0]))]

    def _sidecar_rows(self, planned: list[tuple[int, int, int, int]]) -> list[OutputParity]:
        """A swappable single-adapter export's sidecar MODEL.NAME.onnx_adapter of the exported adapter holds the
        same coefficients as the file's initializers: the shapes again with it active, against the same
        reference; an unreadable sidecar is a failed row."""
        import onnxruntime as ort

        from road_export.graph import swap

        rows: list[OutputParity] = []
        for sidecar in sidecar_files(self.path, self.meta, self.order).values():
            label = f"{sidecar.name}: "
            try:
                swap.check_adapter_file(sidecar, read_record(self.meta, METADATA_SWAP, str(self.path)), self.path.name)
                adapter = ort.LoraAdapter()
                adapter.Load(str(sidecar))
                options = ort.RunOptions()
                options.add_active_adapter(adapter)
            except Exception as e:  # a damaged sidecar is a failed check, not a skipped one
                first = first_line(e)
                rows.append(failed_row(self.output_names[0], label + f"unreadable ({first})"))
                continue
            for batch, seq, past, pad in planned:
                rows.extend(self._check(label + case_label(batch, seq, past, pad, self.spec.cache), batch, seq, past,
                                        pad, run_options=options))
        return rows

    def _prepare(self, batch: int, seq: int, past: int, pad: int, ids: np.ndarray | None = None) -> dict:
        """One case's inputs for both sides (`export.tasks.sample_inputs`); `ids` replaces the token ids."""
        inputs = sample_inputs(self.model, self.spec, batch=batch, seq=seq, seed=self.seed,
                               pad=min(pad, past + seq - 1), past=past)
        if ids is not None:
            inputs["input_ids"] = torch.from_numpy(ids.reshape(batch, seq).astype(np.int64))
        if self.gqa and not past and pad:  # right padding: row 0's tokens moved to the front, for both sides
            shift = int((inputs["attention_mask"][0] == 0).sum())
            for key in ("input_ids", "attention_mask"):
                inputs[key][0] = torch.roll(inputs[key][0], -shift)
        # float feeds go in the file's declared types (a float16 cache): give the reference the same rounded values
        return round_as_fed(inputs, self.declared)

    def _run_file(self, inputs: dict, run_options=None) -> list:
        """The file's outputs on `inputs`, in the reference's order (a builder graph lists keys, then values)."""
        feeds = cast_feeds({n: inputs[n].numpy() for n in self.feeds_needed}, self.declared)
        try:
            got = self.session.run(self.output_names, feeds, run_options)
            return [got[i] for i in self.spec_order]
        finally:
            release_freed_memory()

    def _check(self, case: str, batch: int, seq: int, past: int, pad: int, ids: np.ndarray | None = None,
               run_options=None, ran: tuple[dict, list] | None = None) -> list[OutputParity]:
        """The rows of one case; `ran` = (inputs, the file's outputs) when the file already ran it."""
        spec, atol, by_cosine = self.spec, self.atol, bool(self.quantized)
        inputs, got = ran if ran is not None else (self._prepare(batch, seq, past, pad, ids), None)
        mask = inputs["attention_mask"].numpy().astype(bool)
        self.seen.update(int(i) for i in inputs["input_ids"].numpy()[mask[:, -seq:]])
        with torch.no_grad():
            expected = self.ref_module(**nest(spec, inputs))
        expected = [t.float().numpy() for t in (expected if isinstance(expected, tuple) else (expected,))]
        if got is None:
            got = self._run_file(inputs, run_options)
        if self.order:
            case += ", ids " + ",".join(str(int(i)) for i in inputs["adapter_ids"])
        rows = [compare(self.output_names[0], case, got[0], expected[0], mask[:, -seq:], atol,
                        logits=spec.output_name == "logits", by_cosine=by_cosine)]
        if spec.cache:
            rows.append(compare_present(case, got[1:], expected[1:], mask, atol, by_cosine=by_cosine))
        self.report.longest_sequence = max(self.report.longest_sequence, seq)
        return rows

    def _reference_refuses(self, inputs: dict) -> str | None:
        """None when the reference runs `inputs`, else the first line of its error (the input is beyond what the
        model accepts: the check cannot be built, and the file is not to blame)."""
        try:
            with torch.no_grad():
                self.ref_module(**nest(self.spec, inputs))
        except Exception as e:
            return first_line(e)[:200]
        return None
