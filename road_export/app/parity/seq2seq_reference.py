"""The torch reference for an encoder-decoder export: encoder, first decoder step, step with past, merged decoder.

Each part of the export (road_export.export.seq2seq) runs on onnxruntime against the same part of the reference
(`export.seq2seq.part_module`) on the same inputs; a step with past gets the cache a real first step leaves. A
float16 export is judged against the reference's own float16 error (`comparisons.compare`'s budget).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from road_export.core import requires_export  # noqa: F401  (one clear line without the export extra)
import torch
from torch import nn

from road_export.core.errors import RoadError
from road_export.graph.inspection import read_facts
from road_export.graph.ort_session import new_session
from road_export.app.parity.cases import SEQ2SEQ_SHAPES
from road_export.app.parity.comparisons import TOLERANCE, compare, compare_flat
from road_export.app.parity.feeds import cast_feeds, declared_types, round_as_fed
from road_export.app.parity.report import ParityReport
from road_export.core.names import recorded_adapter_names

__all__ = ["verify_seq2seq"]


def verify_seq2seq(
    directory: str | Path,
    torch_model: nn.Module,
    *,
    shapes: tuple[tuple[int, int, int, int, int], ...] = SEQ2SEQ_SHAPES,
    atol: float | None = None,
    seed: int = 0,
    native: bool | None = None,
    reference: str | None = None,
) -> ParityReport:
    """Compare an encoder-decoder export (road_export.export.seq2seq) with `torch_model` (peft's model or ours) on
    each shape (batch, encoder length, encoder left padding, decoder tokens, past decoder length): the encoder's
    `last_hidden_state` (padded positions left out), the first decoder step (`decoder_model.onnx`: logits and every
    present key/value, the cross-attention ones included) and a step with past (`decoder_with_past_model.onnx`,
    when there: logits and the decoder's present keys/values). The reference runs the same part on the same
    inputs (`export.seq2seq.part_module`). A mixed-adapter file's rows cycle through the adapter ids.
    Raises RoadError for a directory without the files or files onnxruntime cannot load.
    """

    from road_export.export import seq2seq
    from road_export.runtime.seq2seq import find_files

    directory = Path(directory)
    files = find_files(directory)
    if files is None:
        raise RoadError(f"{directory}: no encoder_model.onnx and decoder_model.onnx in it or in its onnx/ folder")
    first = files[seq2seq.SEQ2SEQ_FILES[1]]
    dtype = read_facts(first).dtype
    # float16 without --atol: each row may differ by the reference's own float16 error (`parity.compare`'s budget),
    # measured on a float16 copy of the reference
    half = _half_copy(torch_model) if dtype == "float16" and atol is None else None
    atol = TOLERANCE[dtype] if atol is None else atol
    task = "text2text-generation-with-past" if seq2seq.SEQ2SEQ_FILES[2] in files else "text2text-generation"
    reference_name = reference or ("peft" if hasattr(torch_model, "peft_config") else "road-export loader")
    report = ParityReport(str(directory), dtype, atol, reference=reference_name, budgeted=half is not None)
    kernels = set()
    merged = None
    if seq2seq.SEQ2SEQ_MERGED in files:
        merged = new_session(files[seq2seq.SEQ2SEQ_MERGED], native=native, log_severity=3).session
    for part in seq2seq.parts(torch_model, task, mixed=True):
        path = files[part.file]
        opened = new_session(path, native=native, log_severity=3)
        if opened.road:
            kernels.add("native" if opened.native else "bodies")
        session = opened.session
        names = [i.name for i in session.get_inputs()]
        order: tuple[str, ...] = ()
        if "adapter_ids" in names:
            meta = read_facts(path).metadata
            order = tuple(recorded_adapter_names(meta, str(path)))
        else:
            part = seq2seq._without_ids(part)
        missing = sorted(set(names) - set(part.input_names))
        if missing:
            raise RoadError(f"{path}: inputs {missing} are not inputs of the {part.name} of task {task}")
        ref = seq2seq.part_module(torch_model, part, order)
        outputs = [o.name for o in session.get_outputs()]
        for batch, enc, pad, dec, past in shapes:
            inputs = seq2seq.sample_inputs(torch_model, part, batch=batch, encoder_length=enc, decoder_length=dec,
                                           past=past, pad=min(pad, enc - 1), seed=seed, adapters=len(order))
            if part.name == seq2seq.DECODER_WITH_PAST:
                inputs.update(_real_past(torch_model, part, inputs, order, batch, enc, past, seed))
            declared = declared_types(session)
            inputs = round_as_fed(inputs, declared)
            with torch.no_grad():
                expected = ref(*inputs.values())
            expected = [t.float().numpy() for t in (expected if isinstance(expected, tuple) else (expected,))]
            budgets = _half_budgets(half, part, order, inputs, expected) if half is not None else None
            feeds = cast_feeds({n: inputs[n].numpy() for n in names}, declared)
            got = session.run(outputs, feeds)
            case = f"{part.file}: batch {batch}, encoder {enc}" + (f", pad {pad}" if pad else "")
            if part.name != seq2seq.ENCODER:
                case += f", decoder {dec}" + (f", past {past}" if part.name == seq2seq.DECODER_WITH_PAST else "")
            if order:
                case += ", ids " + ",".join(str(int(i)) for i in inputs["adapter_ids"])
            mask = inputs["attention_mask" if part.name == seq2seq.ENCODER else "encoder_attention_mask"]
            row_mask = mask.numpy().astype(bool) if part.name == seq2seq.ENCODER else None
            report.rows.append(compare(outputs[0], case, got[0], expected[0], row_mask, atol,
                                       logits=outputs[0] == "logits", budget=budgets[0] if budgets else None))
            rest = max(budgets[1:]) if budgets and len(budgets) > 1 else None
            if len(got) > 1:
                report.rows.append(compare_flat(case, got[1:], expected[1:], atol, rest))
            if merged is not None and part.name != seq2seq.ENCODER:
                report.rows += _merged_rows(merged, part, feeds, inputs, expected, case, atol, budgets)
    report.kernels = "/".join(sorted(kernels)) or "-"
    return report


def _half_copy(model: nn.Module) -> nn.Module:
    """A float16 copy of the reference (its own float16 error is a float16 file's budget)."""
    import copy

    return copy.deepcopy(model).half().eval()


def _half_budgets(half: nn.Module, part, order: tuple[str, ...], inputs: dict, expected: list) -> list[float]:
    """Per output of one part, max |reference in float16 - reference in float32| on the same inputs (float inputs
    in float16); 0 where the float16 reference gives non-finite values or another shape (no budget then: the
    row is judged by atol alone)."""
    from road_export.export import seq2seq

    with torch.no_grad():
        out = seq2seq.part_module(half, part, order)(*(v.half() if v.is_floating_point() else v
                                                       for v in inputs.values()))
    out = [t.float().numpy() for t in (out if isinstance(out, tuple) else (out,))]
    budgets = []
    for got, want in zip(out, expected, strict=True):
        ok = got.shape == want.shape and bool(np.isfinite(got).all())
        budgets.append(float(np.abs(got - want).max()) if ok and got.size else 0.0)
    return budgets


def _merged_rows(session, part, feeds: dict, inputs: dict, expected: list, case: str, atol: float,
                 budgets: list[float] | None = None) -> list:
    """decoder_model_merged.onnx on the same step: `use_cache_branch` false with an empty past for the first step,
    true (encoder_hidden_states unused, zeros) for a step with past; its logits and the part's presents compared."""
    from road_export.export import seq2seq

    batch, enc = inputs["encoder_attention_mask"].shape
    declared = declared_types(session)
    feeds = cast_feeds(dict(feeds), declared)
    first = part.name == seq2seq.DECODER
    feeds["use_cache_branch"] = np.array([not first])
    for value in session.get_inputs():
        if value.name in feeds or value.name == "use_cache_branch":
            continue
        if value.name.startswith("past_key_values."):
            feeds[value.name] = np.zeros((batch, value.shape[1], 0 if first else enc, value.shape[3]),
                                         declared.get(value.name, np.float32))
        elif value.name == "encoder_hidden_states":
            feeds[value.name] = np.zeros((batch, enc, value.shape[2]), declared.get(value.name, np.float32))
    names = [o.name for o in session.get_outputs()]
    got = dict(zip(names, session.run(None, feeds), strict=True))
    case = case.replace(part.file, f"{seq2seq.SEQ2SEQ_MERGED} ({'first step' if first else 'with past'})")
    rows = [compare("logits", case, got["logits"], expected[0], None, atol, logits=True,
                    budget=budgets[0] if budgets else None)]
    rows.append(compare_flat(case, [got[n] for n in part.output_names[1:]], expected[1:], atol,
                              max(budgets[1:]) if budgets and len(budgets) > 1 else None))
    return rows


def _real_past(model: nn.Module, part, inputs: dict, order: tuple[str, ...], batch: int, enc: int, past: int,
               seed: int) -> dict[str, torch.Tensor]:
    """The cache a real first step leaves: the reference's `decoder_model` run on `past` tokens over random encoder
    states (with the step's encoder mask and adapter ids), its presents renamed to the with-past inputs."""
    from road_export.export import seq2seq

    first = next(p for p in seq2seq.parts(model, "text2text-generation", mixed=bool(order)) if p.name == "decoder")
    prefix = seq2seq.sample_inputs(model, first, batch=batch, encoder_length=enc, decoder_length=past, seed=seed + 1,
                                   adapters=len(order))
    prefix["encoder_attention_mask"] = inputs["encoder_attention_mask"]
    if order:
        prefix["adapter_ids"] = inputs["adapter_ids"]
    with torch.no_grad():
        out = seq2seq.part_module(model, first, order)(*prefix.values())
    return {"past_key_values." + name[len("present."):]: value
            for name, value in zip(first.output_names[1:], out[1:], strict=True)}
