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
import json
import math
from pathlib import Path

import numpy as np
import onnx
from road_export import requires_export  # noqa: F401  (one clear line without the export extra)
import torch
from torch import nn

from road_export.errors import RoadError
from road_export.export.tasks import TaskModule, infer_task, nest, normalize_task, sample_inputs, task_spec
from road_export.names import PAST, PRESENT
from road_export.parity import (COSINE_MIN, LONG_CAP, SWEEP_BUDGET, SWEEP_CHUNK, SWEEP_ROW, TOLERANCE, OutputParity,
                                ParityReport, compare, merge_rows, skipped_row)

__all__ = ["COSINE_MIN", "TOLERANCE", "OutputParity", "ParityReport", "compare", "onnx_dtype", "onnx_metadata",
           "onnx_quantization", "verify", "verify_seq2seq"]

DEFAULT_SHAPES: tuple[tuple[int, int, int], ...] = ((1, 1, 0), (3, 7, 2), (2, 33, 5))  # (batch, seq, padding)
MIXED_SHAPES: tuple[tuple[int, int, int], ...] = ((1, 1, 0), (4, 7, 2), (3, 33, 5))  # every id appears
# With a cache: (batch, new tokens, past length, padding): prefill, padded prefill, a decode step, a chunk after past
CACHE_SHAPES: tuple[tuple[int, int, int, int], ...] = ((1, 1, 0, 0), (3, 7, 0, 2), (4, 1, 9, 3), (2, 4, 6, 1))
# Coverage checks run besides the shapes above (verify(coverage=True)); SWEEP_ROW, SWEEP_BUDGET, SWEEP_CHUNK and
# LONG_CAP live in road_export.parity, shared with crosscheck's file-against-file check:
# - "vocabulary sweep": every token id once, in rows of SWEEP_ROW tokens (the last row wraps around), so a damaged
#   embedding or tied-head row of any id is seen; special ids (0, 1, 2, the config's bos/eos/pad/unk/
#   decoder_start) and the last id come first. Up to SWEEP_BUDGET ids the whole vocabulary; above it, the special
#   ids plus a seeded random sample, SWEEP_BUDGET ids in all. Runs of at most SWEEP_CHUNK logits values each.
# - "long sequence": one row of min(max_position_embeddings or n_positions, LONG_CAP) tokens, so a learned position
#   table is checked up to its end when it is small (GPT-2's, OPT's, BERT's in the tiny models: 128).
SPECIAL_ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id", "decoder_start_token_id")


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


def onnx_quantization(path: str | Path, meta: dict[str, str] | None = None) -> str | None:
    """The file's quantization ("int4", "int8" from road_export.quantize's record, given in `meta` when the caller
    has read it, else its quantized nodes by op type: `road_export.quantize.quantization`); None for a float file.
    Reads the graph without its weights."""
    from road_export.quantize import METADATA_QUANTIZE, file_quantization, recorded_scheme

    record = (onnx_metadata(path) if meta is None else meta).get(METADATA_QUANTIZE)
    return recorded_scheme(record) if record else file_quantization(path)


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
    graph with a cache. `native` says how road ops run: the native kernels (True), their standard-op bodies
    (False), or the kernels where they build (None), as `RoadSession` does; the report records which.
    With `coverage` (default) two more checks run: a vocabulary sweep and a long sequence (see SWEEP_BUDGET and
    LONG_CAP above); the report records the ids covered and the longest sequence. A swappable single-adapter
    export's sidecar `MODEL.NAME.onnx_adapter` of its own adapter is checked too: the shapes again with it active
    (an unreadable one is a failed row).
    Raises RoadError for a missing or unloadable file, or a file whose inputs the task does not have.
    """
    import onnxruntime as ort

    from road_export import native as road_native

    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise RoadError(f"{onnx_path}: no such ONNX file")
    lent: list = []  # OrtValues over the reference's memory given to the session: they live as long as it does
    if session_options is None:
        session_options = ort.SessionOptions()
        # fatal only: swappable coefficients make onnxruntime warn (not a parity matter), and a failure comes back
        # as one line, not also as onnxruntime's coloured error log (severity 3 still prints errors)
        session_options.log_severity_level = 4
        if onnx_path.with_name(onnx_path.name + ".data").is_file():
            # a large model: onnxruntime maps the aligned `.data` file instead of copying prepacked weights, so
            # verify holds the torch reference and one mapping of the weights, not the weights twice more
            session_options.add_session_config_entry("session.disable_prepacking", "1")
            # activations allocated per run and freed after it, not kept by onnxruntime's arena at their largest
            # (the long sequence's) while the outputs are compared
            session_options.enable_cpu_mem_arena = False
            lent.extend(lend_equal_weights(onnx_path, torch_model, session_options))
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
    told = "--task" if task else "its road_export.task metadata" if meta.get("road_export.task") else "the model"
    task = task or meta.get("road_export.task") or infer_task(torch_model)
    order: tuple[str, ...] = ()
    if any(i.name == "adapter_ids" for i in session.get_inputs()):
        order = tuple(a["name"] for a in sorted(json.loads(meta.get("road_export.adapters", "[]")),
                                                 key=lambda a: a.get("id", 0)))
        check_adapter_names(onnx_path, order, torch_model)
    file_inputs = [i.name for i in session.get_inputs()]
    output_names = [o.name for o in session.get_outputs()]
    if told == "the model" and normalize_task(task) == "text-generation" and any(n.startswith(PAST)
                                                                                 for n in file_inputs):
        task = "text-generation-with-past"  # a file that records no task (a model builder graph) but has a cache
    check_task_fits(onnx_path, normalize_task(task), told, file_inputs, output_names)
    feeds_needed = [i.name for i in session.get_inputs()]
    declared = declared_types(session)
    # whether positions are fed is the file's to say (below); asking the model would run it, paging its weights in
    # before the file's own runs (see `fixed`)
    spec = task_spec(torch_model, task, order, positions="position_ids" in feeds_needed)
    # the reference gets what the file gets: positions where the file takes them (an older file may not)
    names = [n for n in spec.input_names if n in feeds_needed or n != "position_ids"]
    if "position_ids" in feeds_needed and "position_ids" not in names:
        names.insert(2, "position_ids")
    spec = dataclasses.replace(spec, input_names=tuple(names))
    missing = [n for n in feeds_needed if n not in spec.input_names]
    if missing:
        raise RoadError(f"{onnx_path}: inputs {missing} are not inputs of task {spec.task}")
    ref_module = TaskModule(torch_model, spec).eval()
    if reference is None:
        reference_name = "peft" if hasattr(torch_model, "peft_config") else "road-export loader"
    else:
        reference_name = reference
    report = ParityReport(str(onnx_path), dtype, atol, kernels=kernels, reference=reference_name,
                          quantized=quantized)
    if quantized:  # cosine cannot tell a small adapter from quantization error: the file must record it, and a
        # swappable file's coefficients (and its sidecars') must be the reference adapter's, value for value
        row = adapter_record_row(meta, torch_model)
        if row is not None:
            report.rows.append(row)
        report.rows.extend(coefficient_rows(onnx_path, meta, torch_model, order))
    if spec.cache and shapes == DEFAULT_SHAPES:
        shapes = CACHE_SHAPES
    elif order and shapes == DEFAULT_SHAPES:
        shapes = MIXED_SHAPES
    cases = [shape if len(shape) == 4 else (shape[0], shape[1], 0, shape[2]) for shape in shapes]
    # A model builder graph (GroupQueryAttention, road_export.kvcache.GqaCache): each row's tokens start at position
    # 0 (a padded prompt is fed right padded, the reference too) and a past is unpadded; several new tokens on a
    # past run at batch 1 only. Cases it cannot take are reported as skipped, not run and not blamed on the file.
    from road_export.kvcache import GQA_CHUNK_RULE, file_layout

    layout = file_layout(onnx_path, session) if spec.cache else None
    gqa = layout is not None and layout.gqa
    skipped: list[OutputParity] = []
    if gqa:
        runnable = []
        for batch, seq, past, pad in cases:
            label = f"batch {batch}, seq {seq}, past {past}" + (f", pad {pad}" if pad else "")
            if past and seq > 1 and batch > 1:
                skipped.append(skipped_row(output_names[0], label, GQA_CHUNK_RULE + "; run at batch 1"))
                runnable.append((1, seq, past, 0))
            elif past and pad:
                skipped.append(skipped_row(output_names[0], label, "GroupQueryAttention keeps rows right padded "
                                           "from position 0; a padded past is generate's check; run unpadded"))
                runnable.append((batch, seq, past, 0))
            else:
                runnable.append((batch, seq, past, pad))
        cases = runnable
    spec_order = [output_names.index(n) for n in spec.output_names] \
        if sorted(spec.output_names) == sorted(output_names) else list(range(len(output_names)))
    vocab = int(getattr(torch_model.config, "vocab_size", 0) or 0)
    seen: set[int] = set()

    def prepare(batch: int, seq: int, past: int, pad: int, ids: np.ndarray | None = None) -> dict:
        inputs = sample_inputs(torch_model, spec, batch=batch, seq=seq, seed=seed, pad=min(pad, past + seq - 1),
                               past=past)
        if ids is not None:
            inputs["input_ids"] = torch.from_numpy(ids.reshape(batch, seq).astype(np.int64))
        if gqa and not past and pad:  # right padding: row 0's tokens moved to the front, for the file and reference
            shift = int((inputs["attention_mask"][0] == 0).sum())
            for key in ("input_ids", "attention_mask"):
                inputs[key][0] = torch.roll(inputs[key][0], -shift)
        # float feeds go in the file's declared types (a float16 cache): give the reference the same rounded values
        return round_as_fed(inputs, declared)

    def run_file(inputs: dict, run_options=None) -> list:
        feeds = cast_feeds({n: inputs[n].numpy() for n in feeds_needed}, declared)
        try:
            got = session.run(output_names, feeds, run_options)
            return [got[i] for i in spec_order]  # the reference's order (a builder graph lists keys, then values)
        finally:
            release_freed_memory()

    def check(case: str, batch: int, seq: int, past: int, pad: int, ids: np.ndarray | None = None,
              run_options=None, ran: tuple[dict, list] | None = None) -> list:
        """The rows of one case; `ran` = (inputs, the file's outputs) when the file already ran it."""
        inputs, got = ran if ran is not None else (prepare(batch, seq, past, pad, ids), None)
        mask = inputs["attention_mask"].numpy().astype(bool)
        seen.update(int(i) for i in inputs["input_ids"].numpy()[mask[:, -seq:]])
        with torch.no_grad():
            expected = ref_module(**nest(spec, inputs))
        expected = [t.float().numpy() for t in (expected if isinstance(expected, tuple) else (expected,))]
        if got is None:
            got = run_file(inputs, run_options)
        if order:
            case += ", ids " + ",".join(str(int(i)) for i in inputs["adapter_ids"])
        rows = [compare(output_names[0], case, got[0], expected[0], mask[:, -seq:], atol,
                        logits=spec.output_name == "logits", by_cosine=bool(quantized))]
        if spec.cache:
            rows.append(_compare_cache(case, got[1:], expected[1:], mask, atol, by_cosine=bool(quantized)))
        report.longest_sequence = max(report.longest_sequence, seq)
        return rows

    fixed = [(f"batch {batch}, seq {seq}" + (f", past {past}" if spec.cache else "") + (f", pad {pad}" if pad else ""),
              batch, seq, past, pad) for batch, seq, past, pad in cases]
    longest = max_positions(torch_model) if coverage and vocab > 0 else 0
    if longest:
        fixed.append((f"long sequence: seq {longest}", 1, longest, 0, 0))
    # The file runs the fixed cases first, before the reference's weights are touched (they are mapped from the
    # checkpoint and paged in as they are used): onnxruntime's activations for the long sequence, the largest of
    # verify, come and go while one model's weights are resident, not two. Its outputs are kept for the comparison.
    ran = []
    long_skipped = None
    for index, (case, batch, seq, past, pad) in enumerate(fixed):
        inputs = prepare(batch, seq, past, pad)
        try:
            ran.append((inputs, run_file(inputs)))
        except Exception:
            if not longest or index != len(fixed) - 1:
                raise
            # the long sequence, built from the model's config: when the reference cannot run it either, the check
            # cannot be built for this model (say so in the table); when the reference runs it, the file is wrong
            reason = _reference_refuses(ref_module, spec, inputs)
            if reason is None:
                raise
            long_skipped = skipped_row(output_names[0], case, f"the reference cannot run it either: {reason}")
            fixed.pop()
    fixed_rows = [check(*case, ran=outputs) for case, outputs in zip(fixed, ran, strict=True)]
    del ran
    for rows in fixed_rows[:len(cases)]:
        report.rows.extend(rows)
    report.rows.extend(skipped)
    if coverage and vocab > 0:
        row = min(SWEEP_ROW, longest or SWEEP_ROW)
        ids = sweep_ids(torch_model, seed)
        rows_needed = -(-len(ids) // row)
        ids = np.resize(ids, rows_needed * row)  # the last row wraps around to the first ids
        per_run = max(1, SWEEP_CHUNK // (row * max(vocab, 1)))
        parts = []
        for start in range(0, rows_needed, per_run):
            chunk = ids[start * row:(start + per_run) * row]
            parts.append(check("vocabulary sweep", len(chunk) // row, row, 0, 0, chunk))
        swept = len(set(ids.tolist()))
        report.rows.extend(merge_rows([p[i] for p in parts], f"vocabulary sweep: {swept} ids, {row} per row")
                           for i in range(len(parts[0])))
        report.rows.extend([long_skipped] if long_skipped else fixed_rows[-1])  # the long sequence
    if spec.cache and not order:  # generation across the lengths where the model changes (export/rope.thresholds)
        from road_export.crossing import crossing_rows

        report.rows.extend(crossing_rows(onnx_path, session, torch_model, atol=atol, by_cosine=bool(quantized),
                                         exact=dtype == "float32" and not quantized, seed=seed))
    if vocab > 0:
        report.ids_covered = f"{len(seen)}/{vocab}"
    # a swappable single-adapter export's sidecar MODEL.NAME.onnx_adapter of the exported adapter holds the same
    # coefficients as the file's initializers: run the shapes again with it active, against the same reference
    for name, sidecar in sidecar_files(onnx_path, meta, order).items():
        label = f"{sidecar.name}: "
        try:
            from road_export import swap

            swap.check_adapter_file(sidecar, json.loads(meta["road_export.swap"]), onnx_path.name)
            adapter = ort.LoraAdapter()
            adapter.Load(str(sidecar))
            options = ort.RunOptions()
            options.add_active_adapter(adapter)
        except Exception as e:  # a damaged sidecar is a failed check, not a skipped one
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            report.rows.append(OutputParity(output_names[0], label + f"unreadable ({first})", [], math.inf,
                                            math.inf, 0.0, None, False))
            continue
        for batch, seq, past, pad in cases:
            case = label + f"batch {batch}, seq {seq}" + (f", past {past}" if spec.cache else "") + \
                (f", pad {pad}" if pad else "")
            report.rows.extend(check(case, batch, seq, past, pad, run_options=options))
    return report


# onnxruntime's element type names (NodeArg.type) of the float feeds numpy can hold
_FLOAT_FEEDS = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}


def declared_types(session) -> dict[str, type]:
    """{input name: numpy float type} of an onnxruntime session's float inputs, as the file declares them
    (`NodeArg.type`, e.g. "tensor(float16)" for a float16 export's past keys/values and encoder states)."""
    return {i.name: _FLOAT_FEEDS[i.type] for i in session.get_inputs() if i.type in _FLOAT_FEEDS}


def cast_feeds(feeds: dict[str, np.ndarray], declared: dict[str, type]) -> dict[str, np.ndarray]:
    """Each float feed in the type the file declares for it (`declared_types`); other feeds as they are."""
    return {n: v.astype(declared[n]) if n in declared and v.dtype.kind == "f" and v.dtype != declared[n] else v
            for n, v in feeds.items()}


def round_as_fed(inputs: dict[str, torch.Tensor], declared: dict[str, type]) -> dict[str, torch.Tensor]:
    """The reference's float inputs rounded as the file is fed them (float16 where it declares float16), kept
    float32, so both sides see the same values."""
    return {k: v.half().float() if v.is_floating_point() and declared.get(k) is np.float16 else v
            for k, v in inputs.items()}


def _reference_refuses(ref_module: nn.Module, spec, inputs: dict) -> str | None:
    """None when the reference runs `inputs`, else the first line of its error (the input is beyond what the model
    accepts: the check cannot be built, and the file is not to blame)."""
    try:
        with torch.no_grad():
            ref_module(**nest(spec, inputs))
    except Exception as e:
        return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
    return None


def reference_adapters(model: nn.Module) -> list[tuple[str, int]]:
    """(variant or "?", adapted layer count) of each RoAd adapter of a torch model, sorted: peft's RoadLayer and
    road-export's keep one entry per adapter name in `road_theta`; peft's `peft_config[name].variant` names the
    variant (road-export's own layers: "?", not compared)."""
    counts: dict[str, int] = {}
    for module in model.modules():
        theta = getattr(module, "road_theta", None)
        if isinstance(theta, nn.ParameterDict):
            for name in theta.keys():
                counts[name] = counts.get(name, 0) + 1
    configs = getattr(model, "peft_config", {}) or {}
    return sorted((str(getattr(configs.get(n), "variant", "?")), c) for n, c in counts.items())


def adapter_record_row(meta: dict[str, str], model: nn.Module) -> OutputParity | None:
    """A failed "adapters" row when a road-export file (one with road_export.* metadata) records other adapters
    than the reference carries: their number, each one's variant and adapted layer count (names are not compared,
    the caller may load them under others). None when they agree or the file is not road-export's. Quantized files
    need it: int4 noise and a small adapter both move the logits' cosine by about 0.01, so a file exported without
    its adapter would otherwise pass."""
    if not any(k.startswith("road_export.") for k in meta):
        return None
    try:
        records = json.loads(meta.get("road_export.adapters") or "[]")
        recorded = sorted((str(r.get("variant", "?")), len(r.get("layers", []))) for r in records)
    except (ValueError, AttributeError, TypeError):
        recorded = None
    expected = reference_adapters(model)
    if recorded is not None and len(recorded) == len(expected) and all(
            c == ec and (v == ev or "?" in (v, ev)) for (v, c), (ev, ec) in zip(recorded, expected, strict=True)):
        return None
    say = lambda items: ", ".join(f"{v} on {c} layers" for v, c in items) or "none"  # noqa: E731
    return OutputParity("adapters", f"file records {say(recorded) if recorded is not None else 'unreadable'}; "
                        f"reference carries {say(expected)}", [], math.inf, math.inf, 0.0, None, False)


COEFFICIENT_TOLERANCE = {"float32": 1e-5, "float16": 2e-3, "bfloat16": 1e-2}


def coefficient_rows(path: Path, meta: dict[str, str], model: nn.Module, order: tuple[str, ...]) -> list:
    """Rows checking a swappable single-adapter file's rotation coefficients, and those of its sidecar
    `.onnx_adapter` files, against the reference's adapter: for every layer of the file's `road_export.swap`
    record, (c1, c2) computed from the reference module's road_theta / road_alpha by `rotation.coefficients` (peft's
    `_prepare_cols` layout; property-tested against peft) must equal the stored values within
    COEFFICIENT_TOLERANCE of their dtype. Empty for other files. A quantized file needs it: its logits cannot tell
    a small adapter, or another adapter, from int4 noise. peft's RoadLayer and road-export's keep `variant`,
    `group_size`, `road_theta` and `road_alpha` per adapter name; the reference's adapter is its only one, else the
    one of the file's recorded name. An `attach --mode rotate` file (no swap record) is checked the same way
    through its coefficients' names (MODULE.road_c1_NAME), where they are stored whole."""
    from road_export import rotation

    if order:
        return []
    adapters = [a for a in json.loads(meta.get("road_export.adapters") or "[]") if isinstance(a, dict)]
    recorded = [a.get("name") for a in adapters]
    strict = "road_export.swap" in meta
    if strict:
        records = json.loads(meta["road_export.swap"])
    elif len(adapters) == 1 and meta.get("road_export.mode") == "rotate":
        # attach's rotations: fixed coefficients named MODULE.road_c1_NAME / road_c2_NAME; those stored in another
        # form (a lowered tied pair) are left out below
        name = adapters[0].get("name", "default")
        records = {layer: {"c1": f"{layer}.road_c1_{name}", "c2": f"{layer}.road_c2_{name}"}
                   for layer in adapters[0].get("layers", [])}
    else:
        return []
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    modules = dict(base.named_modules())
    expected: dict[str, np.ndarray] = {}
    for layer, record in records.items():
        module = modules.get(layer)
        theta = getattr(module, "road_theta", None)
        if not isinstance(theta, nn.ParameterDict) or not len(theta):
            return [OutputParity("coefficients", f"the reference has no RoAd adapter on {layer}", [], math.inf,
                                 math.inf, 0.0, None, False)]
        name = next(iter(theta.keys())) if len(theta) == 1 else (recorded[0] if recorded else "default")
        if name not in theta:
            return [OutputParity("coefficients", f"the reference's adapters on {layer} are {sorted(theta.keys())}, "
                                 f"none named {name!r}", [], math.inf, math.inf, 0.0, None, False)]
        with torch.no_grad():
            c1, c2 = rotation.coefficients(module.variant[name], module.group_size[name], theta[name].float(),
                                           module.road_alpha[name].float())
        expected[record["c1"]], expected[record["c2"]] = c1.numpy(), c2.numpy()
    proto = onnx.load(str(path), load_external_data=False)  # only the coefficients' bytes are read below
    stored = {}
    for tensor in proto.graph.initializer:
        if tensor.name in expected:
            if onnx.external_data_helper.uses_external_data(tensor):
                onnx.external_data_helper.load_external_data_for_tensor(tensor, str(path.parent))
            stored[tensor.name] = onnx.numpy_helper.to_array(tensor)
    del proto
    if not strict:
        expected = {k: v for k, v in expected.items() if k in stored and stored[k].size == v.size}
        if not expected:
            return []
    sources = [("file", stored)]
    for name, sidecar in sidecar_files(path, meta, order).items():
        try:
            from road_export.swap import read_adapter_values

            values = read_adapter_values(sidecar)
        except Exception:  # an unreadable sidecar is a failed row of the sidecar checks already
            continue
        sources.append((sidecar.name, values))
    rows = []
    for label, values in sources:
        worst, dtype, missing = 0.0, "float32", []
        for key, want in expected.items():
            got = values.get(key)
            if got is None or got.size != want.size:
                missing.append(key)
                continue
            dtype = str(got.dtype)
            worst = max(worst, float(np.abs(got.astype(np.float32).ravel() - want.ravel()).max()))
        ok = not missing and worst <= COEFFICIENT_TOLERANCE.get(dtype, 1e-5)
        case = f"{label}: {len(expected) // 2} layers' c1/c2 against the reference adapter's" + \
            (f" ({len(missing)} missing or misshapen, e.g. {missing[0]})" if missing else "")
        rows.append(OutputParity("coefficients", case, [len(expected)], math.inf if missing else worst,
                                 math.inf if missing else worst, 1.0 if ok else 0.0, None, ok))
    return rows


LEND_MIN_BYTES = 2**20


def release_freed_memory() -> None:
    """Give the memory that an onnxruntime run freed back to the system (glibc's `malloc_trim`, through ctypes;
    nothing on another C library). glibc keeps the freed pages of the arenas onnxruntime's threads allocated from,
    so the torch reference's activations, allocated from other arenas, would come on top of them rather than in
    their place: measured on TinyLlama widths, verify's peak is 0.03 x the weight bytes lower with it."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # musl or another C library: no malloc_trim, nothing kept the same way
        pass


def lend_equal_weights(path: Path, model: nn.Module, session_options) -> list:
    """Lend onnxruntime the reference's own memory for every external-data weight of the file (of at least
    LEND_MIN_BYTES) that equals one of the reference's tensors byte for byte (same shape and dtype; in practice the
    embedding table, which merge and rotate exports write as it is), so that weight is held once, not once by
    torch and once more by onnxruntime's map of the file (the vocabulary sweep touches every row of both).

    The file's bytes are read with plain reads, which count in no process's memory, and compared in full before
    anything is lent: a weight that differs in one byte, or that the file holds short, is not lent and onnxruntime
    runs the file's own, so the checks see exactly what they would see otherwise. Returns the OrtValues lent
    (`session_options.add_initializer`, no copy), which must outlive the session.
    """
    import onnxruntime as ort

    proto = onnx.load(str(path), load_external_data=False)
    candidates: dict[tuple, list[np.ndarray]] = {}
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.device.type == "cpu" and tensor.is_contiguous() and tensor.nbytes >= LEND_MIN_BYTES:
            array = tensor.detach().numpy()
            candidates.setdefault((array.shape, array.dtype.str), []).append(array)
    lent = []
    inputs = {i.name for i in proto.graph.input}  # overridable (swappable) initializers are the file's own
    for init in proto.graph.initializer:
        if init.data_location != onnx.TensorProto.EXTERNAL or init.name in inputs:
            continue
        info = {e.key: e.value for e in init.external_data}
        dtype = onnx.helper.tensor_dtype_to_np_dtype(init.data_type)
        matches = candidates.get((tuple(init.dims), np.dtype(dtype).newbyteorder("<").str), [])
        if not matches or "location" not in info:
            continue
        for array in matches:
            if _same_bytes(path.parent / info["location"], int(info.get("offset", 0)), int(info.get("length", -1)),
                           array):
                value = ort.OrtValue.ortvalue_from_numpy(array)
                session_options.add_initializer(init.name, value)
                lent.append(value)
                break
    return lent


def _same_bytes(data: Path, offset: int, length: int, array: np.ndarray, chunk: int = 4 * 2**20) -> bool:
    """Whether `length` bytes of `data` at `offset` are `array`'s bytes (read in chunks, never mapped)."""
    view = memoryview(array.reshape(-1)).cast("B")
    if length not in (-1, view.nbytes):
        return False
    buffer = bytearray(chunk)
    try:
        with open(data, "rb") as f:
            f.seek(offset)
            for start in range(0, view.nbytes, chunk):
                size = min(chunk, view.nbytes - start)
                got = f.readinto(memoryview(buffer)[:size])
                if got != size or memoryview(buffer)[:size] != view[start:start + size]:
                    return False
    except OSError:
        return False
    return True


def sidecar_files(path: Path, meta: dict[str, str], order: tuple[str, ...]) -> dict[str, Path]:
    """A swappable single-adapter file's sidecars for its own adapter(s): MODEL.NAME.onnx_adapter beside it, NAME
    among the adapters its metadata records ({name: path}); none for a mixed or fixed file."""
    if order or "road_export.swap" not in meta:
        return {}
    names = [a.get("name") for a in json.loads(meta.get("road_export.adapters", "[]")) if isinstance(a, dict)]
    found = {n: path.with_name(f"{path.stem}.{n}.onnx_adapter") for n in names if n}
    return {n: p for n, p in found.items() if p.is_file()}


def check_adapter_names(path: Path, order: tuple[str, ...], model: nn.Module) -> None:
    """A mixed-adapter file routes rows by its adapters' names: the reference must hold the same names."""
    if hasattr(model, "peft_config"):
        have = set(model.peft_config)
    else:
        from road_export.model import adapter_names

        have = set(adapter_names(model))
    unknown = [n for n in order if n not in have]
    if unknown:
        example = " ".join(f"--adapter {n}=PATH" for n in order)
        raise RoadError(f"{path.name} holds adapters {', '.join(order)}; the --adapter names must match the file's "
                        f"(given: {', '.join(sorted(have)) or 'none'}); pass {example}")


TASK_OUTPUTS = ("logits", "last_hidden_state")  # the first output of every task, as optimum names it


def check_task_fits(path: Path, task: str, told: str, inputs: list[str], outputs: list[str]) -> None:
    """The task's inputs and outputs against the file's own, before anything runs (one line naming where the task
    came from: --task, the file's metadata, or the model class). Raises RoadError."""
    cache = any(n.startswith(PAST) for n in inputs) or any(n.startswith(PRESENT) for n in outputs)
    expected_out = "last_hidden_state" if task == "feature-extraction" else "logits"
    problem = None
    if task == "text-generation-with-past" and not cache:
        problem = "takes no past_key_values inputs and gives no present outputs (no key/value cache)"
    elif task != "text-generation-with-past" and cache:
        problem = "has a key/value cache (past_key_values inputs); that is text-generation-with-past"
    elif not outputs or (outputs[0] in TASK_OUTPUTS and outputs[0] != expected_out):
        # a file named as optimum names outputs must give the task's; one with a tracer's names (`linear_14`: a
        # plain torch.onnx export that `optimize` fused) is taken by position
        problem = f"gives {', '.join(outputs[:3])}, not {expected_out}"
    if problem:
        raise RoadError(f"{path.name}: task {task} (from {told}) does not fit the file: it {problem}; pass the "
                        "--task it was exported with (road-export inspect shows its inputs and outputs)")


def max_positions(model: nn.Module) -> int:
    """The long check's length: the positions the model accepts (`usable_positions`) capped at LONG_CAP; LONG_CAP
    where the config names none."""
    usable = usable_positions(model)
    return LONG_CAP if usable is None else max(1, min(usable, LONG_CAP))


def usable_positions(model: nn.Module) -> int | None:
    """The longest row the model's position table takes (None where the config names no table size).

    The config's size (max_position_embeddings, n_positions), less the first row a padding-offset table leaves
    unused: the RoBERTa family (RoBERTa, XLM-RoBERTa, CamemBERT, BERTweet, Longformer, ...; fairseq's convention)
    keeps `nn.Embedding(max_position_embeddings, hidden, padding_idx=pad_token_id)` and numbers a row's tokens
    from `padding_idx + 1` (transformers' `RobertaEmbeddings.create_position_ids_from_input_ids`), so a table of
    130 rows with padding_idx 1 takes 128 tokens. Read off the model's own position table (an nn.Embedding named
    `position_embeddings` / `embed_positions` with a padding_idx), not a list of model types."""
    config = model.config
    size = None
    for key in ("max_position_embeddings", "n_positions"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            size = value
            break
    if size is None:
        return None
    for name, module in model.named_modules():
        if isinstance(module, nn.Embedding) and name.rsplit(".", 1)[-1] in ("position_embeddings", "embed_positions") \
                and module.padding_idx is not None and module.num_embeddings == size:
            return size - (module.padding_idx + 1)
    return size


def special_ids(model: nn.Module) -> list[int]:
    """0, 1, 2, the config's bos/eos/pad/unk/decoder_start ids where set (lists flattened) and the last id."""
    config, vocab = model.config, int(model.config.vocab_size)
    ids = [0, 1, 2]
    for key in SPECIAL_ID_KEYS:
        value = getattr(config, key, None)
        ids += [v for v in (value if isinstance(value, (list, tuple)) else [value]) if isinstance(v, int)]
    ids.append(vocab - 1)
    return list(dict.fromkeys(i for i in ids if 0 <= i < vocab))


def sweep_ids(model: nn.Module, seed: int = 0) -> np.ndarray:
    """The vocabulary sweep's ids: the special ids first, then every other id (vocab_size <= SWEEP_BUDGET), or a
    seeded random sample of the others up to SWEEP_BUDGET ids in all."""
    vocab = int(model.config.vocab_size)
    first = special_ids(model)
    rest = np.setdiff1d(np.arange(vocab), np.array(first, dtype=np.int64))
    if vocab > SWEEP_BUDGET:
        rest = np.sort(np.random.default_rng(seed).choice(rest, SWEEP_BUDGET - len(first), replace=False))
    return np.concatenate([np.array(first, dtype=np.int64), rest.astype(np.int64)])


def _compare_cache(case: str, got: list[np.ndarray], expected: list[np.ndarray], mask: np.ndarray,
                   atol: float, by_cosine: bool = False) -> OutputParity:
    """All present keys/values as one row; positions under padding are left out ([b, h, t, d] -> [real, h, d])."""
    if len(got) != len(expected) or any(g.shape != e.shape for g, e in zip(got, expected, strict=False)):
        return OutputParity("present.*", case, [len(got)], math.inf, math.inf, 0.0, None, False)
    flat = lambda ts: np.concatenate([t.transpose(0, 2, 1, 3)[mask].ravel() for t in ts])  # noqa: E731
    row = compare("present.*", case, flat(got), flat(expected), None, atol, logits=False, by_cosine=by_cosine)
    row.shape = list(got[0].shape)
    return row


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
                report.rows.append(_compare_flat(case, got[1:], expected[1:], atol, rest))
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
    rows.append(_compare_flat(case, [got[n] for n in part.output_names[1:]], expected[1:], atol,
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


def _compare_flat(case: str, got: list[np.ndarray], expected: list[np.ndarray], atol: float,
                  budget: float | None = None) -> OutputParity:
    """All present keys/values of differing lengths (decoder and encoder ones) as one row."""
    if len(got) != len(expected) or any(g.shape != e.shape for g, e in zip(got, expected, strict=False)):
        return OutputParity("present.*", case, [len(got)], math.inf, math.inf, 0.0, None, False)
    flat = lambda ts: np.concatenate([t.astype(np.float32).ravel() for t in ts])  # noqa: E731
    row = compare("present.*", case, flat(got), flat(expected), None, atol, logits=False, budget=budget)
    row.shape = list(got[0].shape)
    return row
