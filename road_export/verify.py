"""The parity harness: onnxruntime against a torch reference on several input shapes, per output.

Unlike a single-shape check that only warns, this runs batch 1 and > 1, sequence 1 and longer, attention
masks with left padding, and fails for real. Padded positions are left out of the comparison: their values
are undefined in both runtimes.

The reference is fed exactly the inputs the file is fed (a client's inputs: `position_ids` from the attention
mask as transformers' generate derives them, where the file takes them), and the report names it: "peft" for the
model peft itself loads (see road_export.source), "road-export loader" for road-export's own model.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
from road_export import requires_export  # noqa: F401  (one clear line without the export extra)
import torch
from torch import nn

from road_export.errors import RoadError
from road_export.export.tasks import TaskModule, infer_task, nest, sample_inputs, task_spec

DEFAULT_SHAPES: tuple[tuple[int, int, int], ...] = ((1, 1, 0), (3, 7, 2), (2, 33, 5))  # (batch, seq, padding)
MIXED_SHAPES: tuple[tuple[int, int, int], ...] = ((1, 1, 0), (4, 7, 2), (3, 33, 5))  # every id appears
# With a cache: (batch, new tokens, past length, padding): prefill, padded prefill, a decode step, a chunk after past
CACHE_SHAPES: tuple[tuple[int, int, int, int], ...] = ((1, 1, 0, 0), (3, 7, 0, 2), (4, 1, 9, 3), (2, 4, 6, 1))
TOLERANCE = {"float32": 1e-4, "float16": 2e-2}
COSINE_MIN = 0.98  # a quantized file (int4/int8 MatMul weights) is judged by cosine, not max abs


@dataclass
class OutputParity:
    """One output on one input shape."""

    output: str
    case: str
    shape: list[int]
    max_abs: float
    max_rel: float
    cosine: float
    top1: float | None
    ok: bool


@dataclass
class ParityReport:
    onnx_path: str
    dtype: str
    atol: float
    rows: list[OutputParity] = field(default_factory=list)
    kernels: str = "-"  # how the road ops ran: "native" kernels, standard-op "bodies", or "-" (none in the file)
    reference: str = "road-export loader"  # what the file was compared with: "peft", or road-export's own model
    quantized: str | None = None  # "int4"/"int8"/an op type: rows are then judged by cosine >= COSINE_MIN

    @property
    def passed(self) -> bool:
        return bool(self.rows) and all(r.ok for r in self.rows)

    def to_json(self) -> str:
        return json.dumps({"onnx_path": self.onnx_path, "dtype": self.dtype, "atol": self.atol,
                           "quantized": self.quantized, "judged_by": self.judged_by, "reference": self.reference,
                           "kernels": self.kernels, "passed": self.passed,
                           "rows": [asdict(r) for r in self.rows]}, indent=2)

    @property
    def judged_by(self) -> str:
        """What decides each row: "max abs <= atol" (float files) or "cosine >= 0.98" (quantized files)."""
        return f"cosine >= {COSINE_MIN:g}" if self.quantized else f"max abs <= {self.atol:g}"

    def table(self, color: bool = False) -> str:
        """The report as a terminal table."""
        from rich.console import Console
        from rich.table import Table

        road = "" if self.kernels == "-" else f", road ops: {self.kernels}"
        judged = f"{self.quantized} quantized, judged by {self.judged_by}" if self.quantized else \
            f"atol {self.atol:g}"
        table = Table(title=f"parity: {Path(self.onnx_path).name} ({self.dtype}, {judged}, "
                            f"reference: {self.reference}{road})")
        result = f"result ({self.judged_by})"
        for col in ("output", "input", "max abs", "max rel", "cosine", "top-1", result):
            table.add_column(col, justify="left" if col in ("output", "input") else "right")
        for r in self.rows:
            top1 = "-" if r.top1 is None else f"{r.top1:.4f}"
            table.add_row(r.output, r.case, f"{r.max_abs:.2e}", f"{r.max_rel:.2e}", f"{r.cosine:.6f}", top1,
                          "ok" if r.ok else "FAIL")
        buf = io.StringIO()
        Console(file=buf, width=110, force_terminal=color, color_system="auto" if color else None).print(table)
        verdict = "PASSED" if self.passed else "FAILED"
        return buf.getvalue() + f"parity {verdict}: {sum(r.ok for r in self.rows)}/{len(self.rows)} checks\n"


def onnx_dtype(path: str | Path) -> str:
    """float16 when the model's first float output is float16, else float32."""
    model = onnx.load(str(path), load_external_data=False)
    for out in model.graph.output:
        if out.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16:
            return "float16"
    return "float32"


def onnx_metadata(path: str | Path) -> dict[str, str]:
    model = onnx.load(str(path), load_external_data=False)
    return {p.key: p.value for p in model.metadata_props}


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
) -> ParityReport:
    """Compare the ONNX file with `torch_model` (float32 reference) on each shape in `shapes`.

    `torch_model` is road-export's model or a peft model (`PeftModel`; a mixed-adapter file's rows then go through
    peft's `adapter_names`). `reference` names it in the report (default: "peft" for a peft model, else
    "road-export loader"). A shape is (batch, sequence, padding), or (batch, sequence, past length, padding) for a
    graph with a cache. `native` says how road ops run: the native kernels (True), their standard-op bodies
    (False), or the kernels where they build (None), as `RoadSession` does; the report records which.
    Raises RoadError for a missing or unloadable file, or a file whose inputs the task does not have.
    """
    import onnxruntime as ort

    from road_export import native as road_native

    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise RoadError(f"{onnx_path}: no such ONNX file")
    if session_options is None:
        session_options = ort.SessionOptions()
        session_options.log_severity_level = 3  # swappable coefficients make onnxruntime warn; not a parity matter
        if onnx_path.with_name(onnx_path.name + ".data").is_file():
            # a large model: onnxruntime maps the aligned `.data` file instead of copying prepacked weights, so
            # verify holds the torch reference and one mapping of the weights, not the weights twice more
            session_options.add_session_config_entry("session.disable_prepacking", "1")
    kernels = "-"
    if road_native.uses_road(onnx_path):
        kernels = "native" if road_native.register(session_options, native) else "bodies"
    try:
        session = ort.InferenceSession(str(onnx_path), sess_options=session_options,
                                       providers=["CPUExecutionProvider"])
    except Exception as e:
        raise RoadError(f"{onnx_path}: onnxruntime cannot load it ({str(e).splitlines()[0]})") from e
    dtype = onnx_dtype(onnx_path)
    atol = TOLERANCE[dtype] if atol is None else atol
    meta = onnx_metadata(onnx_path)
    quantized = onnx_quantization(onnx_path, meta)
    task = task or meta.get("road_export.task") or infer_task(torch_model)
    order: tuple[str, ...] = ()
    if any(i.name == "adapter_ids" for i in session.get_inputs()):
        order = tuple(a["name"] for a in sorted(json.loads(meta.get("road_export.adapters", "[]")),
                                                 key=lambda a: a.get("id", 0)))
    spec = task_spec(torch_model, task, order)
    feeds_needed = [i.name for i in session.get_inputs()]
    # the reference gets what the file gets: positions where the file takes them (an older file may not)
    names = [n for n in spec.input_names if n in feeds_needed or n != "position_ids"]
    if "position_ids" in feeds_needed and "position_ids" not in names:
        names.insert(2, "position_ids")
    spec = dataclasses.replace(spec, input_names=tuple(names))
    missing = [n for n in feeds_needed if n not in spec.input_names]
    if missing:
        raise RoadError(f"{onnx_path}: inputs {missing} are not inputs of task {spec.task}")
    ref_module = TaskModule(torch_model, spec).eval()
    output_names = [o.name for o in session.get_outputs()]
    if reference is None:
        reference_name = "peft" if hasattr(torch_model, "peft_config") else "road-export loader"
    else:
        reference_name = reference
    report = ParityReport(str(onnx_path), dtype, atol, kernels=kernels, reference=reference_name,
                          quantized=quantized)
    if spec.cache and shapes == DEFAULT_SHAPES:
        shapes = CACHE_SHAPES
    elif order and shapes == DEFAULT_SHAPES:
        shapes = MIXED_SHAPES
    cases = [shape if len(shape) == 4 else (shape[0], shape[1], 0, shape[2]) for shape in shapes]
    for batch, seq, past, pad in cases:
        inputs = sample_inputs(torch_model, spec, batch=batch, seq=seq, seed=seed, pad=min(pad, past + seq - 1),
                               past=past)
        if dtype == "float16":  # the cache is fed in float16: give the reference the same rounded values
            inputs = {k: v.half().float() if v.is_floating_point() else v for k, v in inputs.items()}
        with torch.no_grad():
            expected = ref_module(**nest(spec, inputs))
        expected = [t.float().numpy() for t in (expected if isinstance(expected, tuple) else (expected,))]
        feeds = {n: inputs[n].numpy() for n in feeds_needed}
        if dtype == "float16":
            feeds = {n: v.astype(np.float16) if v.dtype.kind == "f" else v for n, v in feeds.items()}
        got = session.run(output_names, feeds)
        mask = inputs["attention_mask"].numpy().astype(bool)
        case = f"batch {batch}, seq {seq}" + (f", past {past}" if spec.cache else "") + (f", pad {pad}" if pad else "")
        if order:
            case += ", ids " + ",".join(str(int(i)) for i in inputs["adapter_ids"])
        report.rows.append(compare(output_names[0], case, got[0], expected[0], mask[:, -seq:], atol,
                                   logits=spec.output_name == "logits", by_cosine=bool(quantized)))
        if spec.cache:
            report.rows.append(_compare_cache(case, got[1:], expected[1:], mask, atol, by_cosine=bool(quantized)))
    return report


def onnx_quantization(path: str | Path, meta: dict[str, str] | None = None) -> str | None:
    """The file's quantization ("int4", "int8" from road_export.quantize's record, or the first quantized op type
    in the graph); None for a float file. Reads the graph without its weights."""
    meta = onnx_metadata(path) if meta is None else meta
    record = meta.get("road_export.quantize")
    if record:
        try:
            return json.loads(record)["scheme"]
        except (ValueError, KeyError, TypeError):
            return record
    from road_export.quantize import QUANTIZED_OPS

    model = onnx.load(str(path), load_external_data=False)
    return next((n.op_type for n in model.graph.node if n.op_type in QUANTIZED_OPS), None)


def _compare_cache(case: str, got: list[np.ndarray], expected: list[np.ndarray], mask: np.ndarray,
                   atol: float, by_cosine: bool = False) -> OutputParity:
    """All present keys/values as one row; positions under padding are left out ([b, h, t, d] -> [real, h, d])."""
    if len(got) != len(expected) or any(g.shape != e.shape for g, e in zip(got, expected, strict=False)):
        return OutputParity("present.*", case, [len(got)], math.inf, math.inf, 0.0, None, False)
    flat = lambda ts: np.concatenate([t.transpose(0, 2, 1, 3)[mask].ravel() for t in ts])  # noqa: E731
    row = compare("present.*", case, flat(got), flat(expected), None, atol, logits=False, by_cosine=by_cosine)
    row.shape = list(got[0].shape)
    return row


def compare(name: str, case: str, got: np.ndarray, expected: np.ndarray, mask: np.ndarray | None, atol: float,
            logits: bool, by_cosine: bool = False) -> OutputParity:
    """Errors of `got` against `expected`. Top-1 agreement is reported, not judged on its own: within max_abs <= atol
    the argmax can only change where the reference's two best logits are within 2 * atol of each other.
    `by_cosine` (a quantized file, whose weights differ from the reference's by design): the row passes when the
    cosine is >= COSINE_MIN instead of max abs <= atol."""
    got = got.astype(np.float32)
    if got.shape != expected.shape:
        return OutputParity(name, case, list(got.shape), math.inf, math.inf, 0.0, None, False)
    if mask is not None and got.ndim == 3 and mask.shape == got.shape[:2]:
        got, expected = got[mask], expected[mask]
    diff = np.abs(got - expected)
    max_abs = float(diff.max()) if diff.size else 0.0
    max_rel = float((diff / np.maximum(np.abs(expected), 1e-6)).max()) if diff.size else 0.0
    denom = float(np.linalg.norm(got) * np.linalg.norm(expected))
    cosine = float((got.ravel() @ expected.ravel()) / denom) if denom else 1.0
    top1 = None
    if logits and got.size:
        g2, e2 = got.reshape(-1, got.shape[-1]), expected.reshape(-1, expected.shape[-1])
        top1 = float((g2.argmax(-1) == e2.argmax(-1)).mean())
    ok = bool(np.isfinite(got).all()) and (cosine >= COSINE_MIN if by_cosine else max_abs <= atol)
    return OutputParity(name, case, list(got.shape), max_abs, max_rel, cosine, top1, ok)


# Encoder-decoder cases: (batch, encoder length, encoder padding, decoder tokens, past decoder length)
SEQ2SEQ_SHAPES: tuple[tuple[int, int, int, int, int], ...] = ((1, 1, 0, 1, 1), (3, 7, 2, 1, 6), (2, 9, 3, 4, 3))


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
    import onnxruntime as ort

    from road_export import native as road_native
    from road_export.export import seq2seq
    from road_export.seq2seq import find_files

    directory = Path(directory)
    files = find_files(directory)
    if files is None:
        raise RoadError(f"{directory}: no encoder_model.onnx and decoder_model.onnx in it or in its onnx/ folder")
    first = files[seq2seq.SEQ2SEQ_FILES[1]]
    dtype = onnx_dtype(first)
    atol = TOLERANCE[dtype] if atol is None else atol
    task = "text2text-generation-with-past" if seq2seq.SEQ2SEQ_FILES[2] in files else "text2text-generation"
    reference_name = reference or ("peft" if hasattr(torch_model, "peft_config") else "road-export loader")
    report = ParityReport(str(directory), dtype, atol, reference=reference_name)
    kernels = set()
    merged = None
    if seq2seq.SEQ2SEQ_MERGED in files:
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if road_native.uses_road(files[seq2seq.SEQ2SEQ_MERGED]):
            road_native.register(options, native)
        merged = ort.InferenceSession(str(files[seq2seq.SEQ2SEQ_MERGED]), sess_options=options,
                                      providers=["CPUExecutionProvider"])
    for part in seq2seq.parts(torch_model, task, mixed=True):
        path = files[part.file]
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if road_native.uses_road(path):
            kernels.add("native" if road_native.register(options, native) else "bodies")
        try:
            session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
        except Exception as e:
            raise RoadError(f"{path}: onnxruntime cannot load it ({str(e).splitlines()[0]})") from e
        names = [i.name for i in session.get_inputs()]
        order: tuple[str, ...] = ()
        if "adapter_ids" in names:
            meta = onnx_metadata(path)
            order = tuple(a["name"] for a in sorted(json.loads(meta.get("road_export.adapters", "[]")),
                                                     key=lambda a: a.get("id", 0)))
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
            if dtype == "float16":
                inputs = {k: v.half().float() if v.is_floating_point() else v for k, v in inputs.items()}
            with torch.no_grad():
                expected = ref(*inputs.values())
            expected = [t.float().numpy() for t in (expected if isinstance(expected, tuple) else (expected,))]
            feeds = {n: inputs[n].numpy() for n in names}
            if dtype == "float16":
                feeds = {n: v.astype(np.float16) if v.dtype.kind == "f" else v for n, v in feeds.items()}
            got = session.run(outputs, feeds)
            case = f"{part.file}: batch {batch}, encoder {enc}" + (f", pad {pad}" if pad else "")
            if part.name != seq2seq.ENCODER:
                case += f", decoder {dec}" + (f", past {past}" if part.name == seq2seq.DECODER_WITH_PAST else "")
            if order:
                case += ", ids " + ",".join(str(int(i)) for i in inputs["adapter_ids"])
            mask = inputs["attention_mask" if part.name == seq2seq.ENCODER else "encoder_attention_mask"]
            row_mask = mask.numpy().astype(bool) if part.name == seq2seq.ENCODER else None
            report.rows.append(compare(outputs[0], case, got[0], expected[0], row_mask, atol,
                                       logits=outputs[0] == "logits"))
            if len(got) > 1:
                report.rows.append(_compare_flat(case, got[1:], expected[1:], atol))
            if merged is not None and part.name != seq2seq.ENCODER:
                report.rows += _merged_rows(merged, part, feeds, inputs, expected, case, atol)
    report.kernels = "/".join(sorted(kernels)) or "-"
    return report


def _merged_rows(session, part, feeds: dict, inputs: dict, expected: list, case: str, atol: float) -> list:
    """decoder_model_merged.onnx on the same step: `use_cache_branch` false with an empty past for the first step,
    true (encoder_hidden_states unused, zeros) for a step with past; its logits and the part's presents compared."""
    from road_export.export import seq2seq

    batch, enc = inputs["encoder_attention_mask"].shape
    feeds = dict(feeds)
    first = part.name == seq2seq.DECODER
    feeds["use_cache_branch"] = np.array([not first])
    for value in session.get_inputs():
        if value.name in feeds or value.name == "use_cache_branch":
            continue
        if value.name.startswith("past_key_values."):
            feeds[value.name] = np.zeros((batch, value.shape[1], 0 if first else enc, value.shape[3]), np.float32)
        elif value.name == "encoder_hidden_states":
            feeds[value.name] = np.zeros((batch, enc, value.shape[2]), np.float32)
    names = [o.name for o in session.get_outputs()]
    got = dict(zip(names, session.run(None, feeds), strict=True))
    case = case.replace(part.file, f"{seq2seq.SEQ2SEQ_MERGED} ({'first step' if first else 'with past'})")
    rows = [compare("logits", case, got["logits"], expected[0], None, atol, logits=True)]
    rows.append(_compare_flat(case, [got[n] for n in part.output_names[1:]], expected[1:], atol))
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


def _compare_flat(case: str, got: list[np.ndarray], expected: list[np.ndarray], atol: float) -> OutputParity:
    """All present keys/values of differing lengths (decoder and encoder ones) as one row."""
    if len(got) != len(expected) or any(g.shape != e.shape for g, e in zip(got, expected, strict=False)):
        return OutputParity("present.*", case, [len(got)], math.inf, math.inf, 0.0, None, False)
    flat = lambda ts: np.concatenate([t.astype(np.float32).ravel() for t in ts])  # noqa: E731
    row = compare("present.*", case, flat(got), flat(expected), None, atol, logits=False)
    row.shape = list(got[0].shape)
    return row
