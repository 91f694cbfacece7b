"""Parity of one ONNX file against another, on onnxruntime alone: no torch, no transformers.

The case this serves: a CI job holds a file it trusts (the export it verified against peft, or the base model's
own export before an `attach`/`optimize`/quantization step) and must prove a new file computes the same. Both files
are run on identical feeds generated from the files' own inputs, on the shapes the torch harness uses (batch 1 and
more, sequence 1 and longer, left padding; a prefill, a decode step and a chunk after cached positions for a
KV-cache decoder), and every output is compared on the positions that are not padding. Two coverage checks follow,
as in the torch harness: a vocabulary sweep (every id of the embedding table once, in rows of SWEEP_ROW) and a long
sequence (LONG_CAP tokens, or fewer when the file's absolute position table is smaller: see `_position_rows`). The cases
are planned by road_export.app.parity.cases, the rows judged by road_export.app.parity.comparisons, as against torch.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from road_export.core.errors import RoadError, first_line
from road_export.core.names import ADAPTER_IDS, METADATA_ADAPTERS, METADATA_SWAP, PAST, PRESENT, positions
from road_export.app.parity.cases import (CACHE_SHAPES, DEFAULT_SHAPES, LONG_CAP, SWEEP_ROW, as_cases, case_label,
                                      special_ids, sweep_ids, sweep_runs)
from road_export.app.parity.comparisons import (TOLERANCE, OutputParity, compare, compare_present, failed_row,
                                                merge_rows,
                                            skipped_row)
from road_export.app.parity.feeds import FLOAT_FEEDS
from road_export.app.parity.report import ParityReport
from road_export.core.names import read_record

__all__ = ["CACHE_SHAPES", "SHAPES", "verify_against_file"]

SHAPES = DEFAULT_SHAPES  # (batch, sequence, padding), the torch harness's; CACHE_SHAPES for a graph with a cache
_KNOWN = {"input_ids", "attention_mask", "position_ids", "token_type_ids", ADAPTER_IDS}


def _signature(session) -> tuple[dict[str, tuple[str, list]], list[str]]:
    return {i.name: (i.type, list(i.shape)) for i in session.get_inputs()}, [o.name for o in session.get_outputs()]


def _vocab_size(path: Path, session) -> int | None:
    """Rows of the embedding table that `input_ids` indexes (a Gather on an initializer), else logits' last axis."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    dims = {t.name: list(t.dims) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Gather" and len(node.input) == 2 and node.input[1] == "input_ids" \
                and node.input[0] in dims:
            return int(dims[node.input[0]][0])
    for out in session.get_outputs():
        if out.name == "logits" and isinstance(out.shape[-1], int):
            return int(out.shape[-1])
    return None


def _position_rows(path: Path) -> int | None:
    """Positions the file's absolute position table holds, None without one.

    The table is a 2-D initializer that a Gather indexes with values computed from the `position_ids` input alone
    (GPT-2's wpe; OPT's offset table through `position_ids + 2`: its rows less the constant added), or, in a file
    without that input, from initializers and a Shape alone (BERT's position buffer sliced to the sequence
    length: a Shape of an input passes a length, not values). The smallest such table counts. Token tables (fed
    from input_ids, token_type_ids) and rotary caches computed without a Gather are not position tables."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path), load_external_data=False).graph
    inits = {t.name: t for t in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    graph_inputs = {i.name for i in graph.input} - set(inits)

    def scalar(name: str) -> int | None:
        tensor = inits.get(name)
        if tensor is None or tensor.data_location == onnx.TensorProto.EXTERNAL or np.prod(tensor.dims) != 1:
            return None
        value = numpy_helper.to_array(tensor).ravel()[0]
        return int(value) if np.issubdtype(value.dtype, np.integer) else None

    def sources(name: str) -> tuple[set[str], int, bool]:
        """The graph inputs whose values reach `name`, the integer constants added on the way, and whether a
        Shape is on the way."""
        found, offset, shaped, todo, seen = set(), 0, False, [name], set()
        while todo:
            current = todo.pop()
            if current in seen or not current or current in inits:
                continue
            seen.add(current)
            if current in graph_inputs:
                found.add(current)
                continue
            node = producer.get(current)
            shaped = shaped or (node is not None and node.op_type == "Shape")
            if node is None or node.op_type == "Shape":
                continue
            if node.op_type == "Add" and len(node.input) == 2:
                added = [scalar(i) for i in node.input]
                offset += next((a for a in added if a is not None), 0)
            todo.extend(node.input)
        return found, offset, shaped

    rows = []
    for node in graph.node:
        table = inits.get(node.input[0]) if node.op_type == "Gather" and len(node.input) == 2 else None
        if table is None or len(table.dims) != 2:
            continue
        found, offset, shaped = sources(node.input[1])
        if found == {"position_ids"} or (not found and shaped and "position_ids" not in graph_inputs):
            rows.append(int(table.dims[0]) - max(offset, 0))
    return min(rows) if rows else None


def _feeds(inputs: dict[str, tuple[str, list]], batch: int, seq: int, past: int, pad: int, vocab: int,
           adapters: int, rng: np.random.Generator, ids: np.ndarray | None = None,
           first_row: int = 0) -> dict[str, np.ndarray]:
    """One case's feeds; `ids` [batch, seq] replaces the random token ids, `first_row` continues the adapter ids'
    cycle from an earlier run's rows (the sweep's runs)."""
    if ids is None:
        ids = rng.integers(0, vocab, (batch, seq), dtype=np.int64)
        if seq >= 4:  # the usual special ids and the last id (a shorter case keeps its random ids: id 0 alone, often
            # the padding id with a zero embedding row, would compare two zero outputs)
            ids[-1, -4:] = np.array([0, 1, 2, vocab - 1], dtype=np.int64)  # a left-padded row's last positions
    mask = np.ones((batch, past + seq), dtype=np.int64)
    mask[0, :pad] = 0
    feeds: dict[str, np.ndarray] = {}
    for name, (kind, shape) in inputs.items():
        if name == "input_ids":
            feeds[name] = ids
        elif name == "attention_mask":
            feeds[name] = mask
        elif name == "position_ids":
            feeds[name] = positions(mask)[:, -seq:]
        elif name == "token_type_ids":
            feeds[name] = np.zeros((batch, seq), dtype=np.int64)
        elif name == ADAPTER_IDS:
            feeds[name] = (np.arange(batch, dtype=np.int64) + 1 + first_row) % (adapters + 1)
        elif name.startswith(PAST):
            heads, dim = shape[1], shape[3]
            feeds[name] = rng.standard_normal((batch, heads, past, dim)).astype(FLOAT_FEEDS.get(kind, np.float32))
    return feeds


def _session(path: Path, native: bool | None):
    from road_export.runtime.session import RoadSession

    return RoadSession(path, native=native)


def verify_against_file(onnx_path: str | Path, reference_path: str | Path, *, atol: float | None = None,
                        native: bool | None = None, seed: int = 0) -> ParityReport:
    """Compare `onnx_path` with `reference_path` (both ONNX files) on onnxruntime, output by output.

    Both files must take the same inputs (names, element types, ranks) and give the same outputs by name; inputs
    are generated from the files: `input_ids` over the whole id range of the embedding table (ids 0-2 and the last
    id fed on unpadded positions of every case long enough), `attention_mask` with left padding, `position_ids`
    from the mask as transformers derives them, `adapter_ids` cycling through the file's adapters, random
    `past_key_values.*` [batch, kv_heads, past, head_dim]. Logits and hidden states are compared where the mask is
    1; `present.*` on the unpadded positions.
    After the shapes, as verify does against torch: a vocabulary sweep (every id of the embedding table once, in
    rows of SWEEP_ROW tokens, 0, 1, 2 and the last id first; above SWEEP_BUDGET ids a seeded sample; several rows
    per run, SWEEP_CHUNK logits values at most; one merged row per output) and a long sequence of LONG_CAP tokens,
    fewer when the file has a smaller absolute position table (`_position_rows`); both unpadded, prefills with an
    empty cache for a decoder with past. The report records `ids_covered` and `longest_sequence`.
    `atol` defaults by the reference's output dtype (1e-4 float32, 2e-2 float16). `native` runs road ops on the
    native kernels (True), the bodies (False) or the kernels where they build (None), as RoadSession does.
    When both files are swappable, one row per adapter sidecar beside either (`_sidecar_rows`).

    Raises RoadError when a file is missing or unloadable, when the files' inputs or outputs differ, when an
    input cannot be generated (an input name this check does not know, or an embedding table it cannot find), or
    when `atol` is given for files compared by cosine (one quantized, the other not or otherwise).
    """
    onnx_path, reference_path = Path(onnx_path), Path(reference_path)
    if onnx_path.resolve() == reference_path.resolve():
        raise RoadError(f"--against {reference_path}: the reference is the file being verified; give the file "
                        "you trust (e.g. the verified export before attach/optimize/quantization)")
    got_session, ref_session = _session(onnx_path, native), _session(reference_path, native)
    # a quantized file against a float one (or another scheme) differs by design: judged by cosine, as verify
    # judges a quantized file against peft; two files quantized alike must agree within atol
    from road_export.graph.inspection import read_facts

    facts, ref_facts = read_facts(onnx_path), read_facts(reference_path)
    schemes = [facts.quantization, ref_facts.quantization]
    by_cosine = schemes[0] != schemes[1]
    if by_cosine and atol is not None:  # a tolerance would not change the verdict: refused, not silently ignored
        from road_export.app.parity.comparisons import COSINE_MIN, TOKEN_COSINE_MIN

        first, second = (onnx_path, reference_path) if schemes[0] else (reference_path, onnx_path)
        other = f"is {schemes[1]}-quantized" if schemes[0] and schemes[1] else "is not"
        raise RoadError(f"--atol {atol:g}: {first} is {schemes[0] or schemes[1]}-quantized and {second} {other}, "
                        f"so the files are compared by cosine (>= {COSINE_MIN:g}, each token >= "
                        f"{TOKEN_COSINE_MIN:g}); drop --atol")
    (inputs, outputs), (ref_inputs, ref_outputs) = _signature(got_session.session), _signature(ref_session.session)
    if {n: (t, len(s)) for n, (t, s) in inputs.items()} != {n: (t, len(s)) for n, (t, s) in ref_inputs.items()}:
        raise RoadError(f"{onnx_path}: its inputs {sorted(inputs)} differ from {reference_path.name}'s "
                        f"{sorted(ref_inputs)} (names, element types or ranks); compare files of the same task")
    if sorted(outputs) != sorted(ref_outputs):
        raise RoadError(f"{onnx_path}: its outputs {outputs} differ from {reference_path.name}'s {ref_outputs}")
    unknown = [n for n in inputs if n not in _KNOWN and not n.startswith(PAST)]
    if unknown:
        raise RoadError(f"{onnx_path}: no inputs can be generated for {unknown}; this check knows token inputs, "
                        "attention_mask, position_ids, adapter_ids and past_key_values.*")
    vocab = _vocab_size(reference_path, ref_session.session) if "input_ids" in inputs else 1
    if vocab is None:
        raise RoadError(f"{reference_path}: cannot tell the vocabulary size (no Gather on an embedding table fed by "
                        "input_ids, no static logits axis)")
    adapters = len(read_record(ref_facts.metadata, METADATA_ADAPTERS, str(reference_path), []))
    dtype = ref_facts.dtype  # the reference's declared outputs (inspection.read_facts), as verify reads a file's
    atol = TOLERANCE[dtype] if atol is None else atol
    from road_export.graph import native as road_native

    kernels = "native" if got_session.native else ("bodies" if road_native.uses_road(onnx_path) else "-")
    report = ParityReport(str(onnx_path), dtype, atol, kernels=kernels, reference=f"file {reference_path.name}",
                          quantized=(schemes[0] or schemes[1]) if by_cosine else None)
    cache = any(n.startswith(PAST) for n in inputs)
    cases = as_cases(CACHE_SHAPES if cache else SHAPES)
    present = [n for n in outputs if n.startswith(PRESENT)]
    seen: set[int] = set()

    def check(case: str, batch: int, seq: int, past: int, pad: int, ids: np.ndarray | None = None,
              first_row: int = 0, skippable: bool = False) -> list[OutputParity]:
        """Both files on one case's feeds: a row per output (the present.* outputs as one row). `skippable` (the
        long sequence, whose length comes from the file's table without the model's rules, e.g. RoBERTa's
        padding_idx + 1 offset): when the trusted file cannot run the case either, a skipped row saying so."""
        feeds = _feeds(inputs, batch, seq, past, pad, vocab, adapters, rng, ids, first_row)
        try:
            got = dict(zip(outputs, got_session.session.run(outputs, feeds), strict=True))
            expected = dict(zip(outputs, ref_session.session.run(outputs, feeds), strict=True))
        except Exception as e:
            if skippable:
                try:
                    ref_session.session.run(outputs, feeds)
                except Exception as trusted:
                    reason = first_line(trusted)[:200]
                    return [skipped_row(outputs[0], case, f"the trusted file cannot run it either: {reason}")]
            raise RoadError(f"{onnx_path}: onnxruntime cannot run it on generated inputs "
                            f"({first_line(e)})") from e
        mask = feeds["attention_mask"].astype(bool) if "attention_mask" in feeds else np.ones((batch, seq), bool)
        if "input_ids" in feeds:
            seen.update(np.unique(feeds["input_ids"][mask[:, -seq:]]).tolist())
        report.longest_sequence = max(report.longest_sequence, seq)
        rows = [compare(name, case, got[name], expected[name].astype(np.float32), mask[:, -seq:], atol,
                        logits=name == "logits", by_cosine=by_cosine)
                for name in outputs if not name.startswith(PRESENT)]
        if present:
            rows.append(compare_present(case, [got[n] for n in present], [expected[n] for n in present], mask,
                                        atol, by_cosine))
        return rows

    rng = np.random.default_rng(seed)
    for batch, seq, past, pad in cases:
        pad = min(pad, past + seq - 1)
        report.rows.extend(check(case_label(batch, seq, past, pad, cache), batch, seq, past, pad))
    if "input_ids" in inputs:
        # the coverage checks, as verify runs them against torch (prefills with an empty cache for a decoder with
        # past): every id of the embedding table once, in rows of SWEEP_ROW, and one long row
        longest = min(LONG_CAP, _position_rows(reference_path) or LONG_CAP)
        row = min(SWEEP_ROW, longest)
        ids = sweep_ids(vocab, special_ids(None, vocab), seed)  # no config: 0, 1, 2 and the last id first
        parts = [check("vocabulary sweep", len(chunk), row, 0, 0, chunk, first)
                 for first, chunk in sweep_runs(ids, row, vocab)]
        swept = len(set(ids.tolist()))
        report.rows.extend(merge_rows([p[i] for p in parts], f"vocabulary sweep: {swept} ids, {row} per row")
                           for i in range(len(parts[0])))
        report.rows.extend(check(f"long sequence: seq {longest}", 1, longest, 0, 0, skippable=True))
        report.ids_covered = f"{len(seen)}/{vocab}"
    if all(METADATA_SWAP in f.metadata for f in (facts, ref_facts)):
        report.rows.extend(_sidecar_rows(onnx_path, reference_path, atol))
    return report


def _sidecar_rows(onnx_path: Path, reference_path: Path, atol: float) -> list[OutputParity]:
    """One row per adapter sidecar beside either swappable file (`NEW.stem.NAME.onnx_adapter` against
    `TRUSTED.stem.NAME.onnx_adapter`): it passes when both files exist, hold the same parameter names and shapes, and
    their values agree within `atol`; a sidecar beside one file only, or an unreadable one, fails."""
    from road_export.graph.swap import read_adapter_values, sidecar_candidates

    # by name only, fingerprints unchecked: the values are compared
    got_files, ref_files = sidecar_candidates(onnx_path), sidecar_candidates(reference_path)

    def values(file: Path) -> dict[str, np.ndarray]:
        return {k: v.astype(np.float32, copy=False) for k, v in read_adapter_values(file).items()}

    rows = []
    for name in sorted(set(got_files) | set(ref_files)):
        got_file, ref_file = got_files.get(name), ref_files.get(name)
        if got_file is None or ref_file is None:
            there, missing = (ref_file, onnx_path) if got_file is None else (got_file, reference_path)
            rows.append(failed_row("sidecar", f"sidecar {name}: only {there.name}, none beside {missing.name}"))
            continue
        try:
            got, expected = values(got_file), values(ref_file)
        except Exception as e:
            rows.append(failed_row("sidecar", f"sidecar {name}: unreadable ({first_line(e)[:80]})"))
            continue
        case = f"sidecar {name}: parameters of {got_file.name}"
        if {k: v.shape for k, v in got.items()} != {k: v.shape for k, v in expected.items()}:
            rows.append(failed_row("sidecar", f"{case}: names or shapes differ from {ref_file.name}'s"))
            continue
        keys = sorted(got)
        flat = lambda d, keys=keys: (np.concatenate([d[k].ravel() for k in keys]) if keys  # noqa: E731
                                     else np.zeros(0, np.float32))
        row = compare("sidecar", case, flat(got), flat(expected), None, atol, logits=False)
        row.shape = [len(keys)]
        rows.append(row)
    return rows
