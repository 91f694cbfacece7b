"""`road-export verify MODEL --against REF.onnx`: one ONNX file against another on onnxruntime, without torch."""
# ruff: noqa: F811  (the session fixtures of test_cli are imported, then named as test arguments)

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
import torch
from conftest import tiny
from onnx import numpy_helper
from test_cli import assert_bad_input, exported, llama_dirs, road_export  # noqa: F401  (session fixtures)
from test_floor import BLOCK_TORCH, run_python

import road_export as rx
from road_export.app.parity import file_reference as crosscheck
from road_export.app.parity.file_reference import verify_against_file

SWEEP, LONG = "vocabulary sweep: 256 ids, 64 per row", "long sequence: seq"


def _planted(path, out, name_part: str | None, row: int, zero: bool = False):
    """A copy of `path` with row `row` of the first initializer whose name holds `name_part` (None: the first
    2-D weight that is not the embedding table) moved by 0.5, or with `zero` zeroed (a LayerNorm after a
    residual sum takes out a uniform move)."""
    model = onnx.load(str(path))
    for init in model.graph.initializer:
        if (name_part in init.name) if name_part else (len(init.dims) == 2 and "embed" not in init.name):
            array = numpy_helper.to_array(init).copy()
            array[row] = 0 if zero else array[row] + 0.5
            init.CopyFrom(numpy_helper.from_array(array, init.name))
            break
    else:
        raise AssertionError(f"no initializer named like {name_part}")
    onnx.save(model, str(out))
    return out


def _random_ids(vocab: int, long: int, seed: int = 0) -> set[int]:
    """The ids the three shapes and the long sequence of `long` tokens feed on unpadded positions (crosscheck's
    generator replayed: the sweep's given ids draw nothing from it)."""
    rng, fed = np.random.default_rng(seed), set()
    inputs = {"input_ids": ("tensor(int64)", []), "attention_mask": ("tensor(int64)", [])}
    for batch, seq, pad in (*crosscheck.SHAPES, (1, long, 0)):
        feeds = crosscheck._feeds(inputs, batch, seq, 0, min(pad, seq - 1), vocab, 0, rng)
        fed.update(feeds["input_ids"][feeds["attention_mask"].astype(bool)].tolist())
    return fed


def failed(report) -> list[str]:
    return [r.case for r in report.rows if not r.ok]


@pytest.fixture(scope="module")
def gpt2_pair(tmp_path_factory):
    """A tiny GPT-2 export (a learned position table of 128 rows, fed by position_ids) and a copy of it."""
    torch.manual_seed(0)
    model = rx.get_road_model(tiny("tiny-gpt2"), rx.RoadConfig(variant="road_1", group_size=8, init_weights=False,
                                                               target_modules=["c_attn"]))
    root = tmp_path_factory.mktemp("gpt2")
    rx.export(model, root / "g.onnx")
    shutil.copy(root / "g.onnx", root / "copy.onnx")
    return root / "copy.onnx", root / "g.onnx"


def test_rotate_against_merged_passes(exported):
    (merged, _), (rotated, _) = exported["merge"], exported["rotate"]
    report = verify_against_file(rotated, merged)
    assert report.passed, report.table()
    # the three shapes, the vocabulary sweep (every id once: one merged row) and a long sequence of 256 (Llama's
    # positions are rotary: no table bounds them)
    assert report.reference == f"file {merged.name}" and len(report.rows) == 5
    assert [r.case for r in report.rows[3:]] == [SWEEP, f"{LONG} 256"] and report.rows[3].shape == [256, 256]
    assert report.ids_covered == "256/256" and report.longest_sequence == 256
    assert "ids covered: 256/256, longest sequence: 256" in report.table()
    assert report.rows[0].output == "logits" and report.rows[0].max_abs < 1e-4


def test_an_embedding_row_the_shapes_miss_fails_on_the_sweep(exported, tmp_path):
    """One damaged embedding row of an id the three shapes (and the long sequence's random ids) never feed: only
    the vocabulary sweep sees it."""
    merged, _ = exported["merge"]
    missed = sorted(set(range(3, 255)) - _random_ids(256, 256))
    assert missed
    bad = _planted(merged, tmp_path / "row.onnx", "embed_tokens", missed[len(missed) // 2])
    report = verify_against_file(bad, merged)
    assert not report.passed and failed(report) == [SWEEP], report.table()
    assert report.ids_covered == "256/256"


def test_learned_positions_bound_the_long_sequence(gpt2_pair):
    copy, trusted = gpt2_pair
    assert crosscheck._position_rows(trusted) == 128
    report = verify_against_file(copy, trusted)
    assert report.passed and report.ids_covered == "256/256" and report.longest_sequence == 128, report.table()
    assert report.rows[-1].case == f"{LONG} 128"


def test_a_late_position_row_fails_on_the_long_sequence(gpt2_pair, tmp_path):
    """GPT-2's wpe row 100: beyond the shapes' 33 positions and the sweep's 64, only the long sequence feeds it."""
    _, trusted = gpt2_pair
    bad = _planted(trusted, tmp_path / "wpe.onnx", "wpe", 100, zero=True)
    report = verify_against_file(bad, trusted)
    assert not report.passed and failed(report) == [f"{LONG} 128"], report.table()


def test_a_cached_mixed_decoder_sweeps_as_prefills(llama_dirs, tmp_path):  # noqa: F811
    """A KV-cache decoder with two adapters: the sweep and the long sequence run with an empty past, their
    present.* outputs compared too; adapter ids cycle over the sweep's rows."""
    path = tmp_path / "decoder.onnx"
    proc = road_export("--base", llama_dirs / "base", "--adapter", f"one={llama_dirs / 'road'}", "--adapter",
                       f"two={llama_dirs / 'other'}", "--task", "text-generation-with-past", "--mode", "rotate",
                       "--no-verify", path)
    assert proc.returncode == 0, proc.stderr
    shutil.copy(path, tmp_path / "copy.onnx")
    report = verify_against_file(tmp_path / "copy.onnx", path)
    assert report.passed and report.ids_covered == "256/256" and report.longest_sequence == 256, report.table()
    assert [(r.output, r.case) for r in report.rows[-4:]] == [("logits", SWEEP), ("present.*", SWEEP),
                                                              ("logits", f"{LONG} 256"), ("present.*", f"{LONG} 256")]
    bad = _planted(path, tmp_path / "bad.onnx", "embed_tokens", sorted(set(range(3, 255)) - _random_ids(256, 256))[0])
    assert SWEEP in failed(verify_against_file(bad, path))


def test_a_planted_fault_fails(exported, tmp_path):
    merged, _ = exported["merge"]
    weight = _planted(merged, tmp_path / "weight.onnx", None, 0)
    assert not verify_against_file(weight, merged).passed
    # token id 0 is fed in every case of 4 tokens or more: a broken embedding row of a special token is caught too
    special = _planted(merged, tmp_path / "embed.onnx", "embed_tokens", 0)
    report = verify_against_file(special, merged)
    assert not report.passed and report.rows[1].max_abs > 1e-2 and report.rows[2].max_abs > 1e-2, report.table()
    assert not report.rows[3].ok  # the sweep feeds id 0 first


def test_cli_against(exported, tmp_path):
    (merged, _), (rotated, _) = exported["merge"], exported["rotate"]
    good = road_export("verify", rotated, "--against", merged, "--report", tmp_path / "p.json")
    assert good.returncode == 0 and "parity PASSED" in good.stdout and f"reference: file {merged.name}" in good.stdout
    assert json.loads((tmp_path / "p.json").read_text())["passed"] is True
    bad = road_export("verify", _planted(merged, tmp_path / "bad.onnx", None, 1), "--against", merged)
    assert bad.returncode == 1 and "parity FAILED" in bad.stdout


def test_cli_against_bad_input(exported, llama_dirs, tmp_path):  # noqa: F811
    merged, _ = exported["merge"]
    assert_bad_input(road_export("verify", merged, "--against", merged), says="the reference is the file being")
    assert_bad_input(road_export("verify", merged, "--against", merged, "--base", llama_dirs / "base"),
                     says="--base with --against")
    assert_bad_input(road_export("verify", merged, "--against", tmp_path / "none.onnx"), says="none.onnx")
    (tmp_path / "empty.onnx").write_bytes(b"")
    assert_bad_input(road_export("verify", merged, "--against", tmp_path / "empty.onnx"), says="empty.onnx")
    other = tmp_path / "other.onnx"  # another task: a graph whose inputs differ
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2])
    y = onnx.helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, [2])
    graph = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["x"], ["logits"])], "g", [x], [y])
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18)], ir_version=10), other)
    assert_bad_input(road_export("verify", merged, "--against", other), says="differ from")


def test_against_runs_without_torch(exported, tmp_path):
    (merged, _), (rotated, _) = exported["merge"], exported["rotate"]
    code = BLOCK_TORCH + (f"from road_export.app.parity.file_reference import verify_against_file\n"
                          f"r = verify_against_file({str(rotated)!r}, {str(merged)!r})\n"
                          "import sys\nassert 'torch' not in sys.modules\nprint(r.passed)")
    done = run_python(code, tmp_path)
    assert done.returncode == 0 and done.stdout.strip() == "True", done.stderr


def test_vocab_from_the_embedding_table(exported):
    merged, _ = exported["merge"]
    table = next(i for i in onnx.load(str(merged), load_external_data=False).graph.initializer
                 if "embed_tokens" in i.name)
    assert np.prod(table.dims) > 0


def test_atol_refused_when_one_file_is_quantized(exported, tmp_path):
    """int4 against float is judged by cosine: an explicit --atol would be ignored, so it is refused (both ways);
    without --atol the check runs."""
    from road_export.graph.quantize import quantize_file

    merged, _ = exported["merge"]
    int4 = tmp_path / "int4.onnx"
    quantize_file(merged, int4, "int4")
    with pytest.raises(rx.RoadError, match="drop --atol"):
        verify_against_file(int4, merged, atol=1e-3)
    assert_bad_input(road_export("verify", int4, "--against", merged, "--atol", "1e-3"),
                     says=f"--atol 0.001: {int4} is int4-quantized and {merged} is not, so the files are compared "
                          "by cosine (>= 0.98, each token >= 0.9); drop --atol")
    assert_bad_input(road_export("verify", merged, "--against", int4, "--atol", "1e-3"),
                     says=f"{int4} is int4-quantized and {merged} is not")
    assert verify_against_file(int4, merged).quantized == "int4"


@pytest.fixture
def swappable_pair(exported, tmp_path):
    """Two copies of the single-adapter rotate export (swappable), each with its `default` sidecar."""
    rotated, _ = exported["rotate"]
    sidecar = rotated.with_name(f"{rotated.stem}.default.onnx_adapter")
    assert sidecar.is_file()
    for stem in ("new", "trusted"):
        shutil.copy(rotated, tmp_path / f"{stem}.onnx")
        shutil.copy(sidecar, tmp_path / f"{stem}.default.onnx_adapter")
    return tmp_path / "new.onnx", tmp_path / "trusted.onnx"


def test_sidecars_compared(swappable_pair):
    import onnxruntime as ort

    from road_export.graph.swap import write_adapter_file

    new, trusted = swappable_pair
    report = verify_against_file(new, trusted)
    rows = [r for r in report.rows if r.output == "sidecar"]
    assert report.passed and len(rows) == 1
    assert rows[0].case == "sidecar default: parameters of new.default.onnx_adapter"
    assert rows[0].max_abs == 0, report.table()

    file = new.with_name("new.default.onnx_adapter")
    adapter = ort.AdapterFormat.read_adapter(str(file))  # held while copying: the values are views of its memory
    values = {k: v.numpy().copy() for k, v in adapter.get_parameters().items()}
    first = sorted(values)[0]
    values[first].flat[0] += 5e-4
    write_adapter_file(file, values)
    report = verify_against_file(new, trusted)
    assert failed(report) == ["sidecar default: parameters of new.default.onnx_adapter"], report.table()
    assert 4e-4 < report.rows[-1].max_abs < 6e-4

    file.unlink()
    report = verify_against_file(new, trusted)
    assert failed(report) == ["sidecar default: only trusted.default.onnx_adapter, none beside new.onnx"], \
        report.table()
    shutil.copy(trusted.with_name("trusted.default.onnx_adapter"), new.with_name("new.other.onnx_adapter"))
    shutil.copy(trusted.with_name("trusted.default.onnx_adapter"), file)
    report = verify_against_file(new, trusted)
    assert failed(report) == ["sidecar other: only new.other.onnx_adapter, none beside trusted.onnx"], report.table()
