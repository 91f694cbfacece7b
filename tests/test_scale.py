"""Bounded-memory paths (issue 17) produce the same files as the in-memory ones: export's lazy transposed and
merged weights, external data chosen by size, attach and optimize copying or folding weights from `.data`.
Memory itself is measured by tools/bench_scale.py, not here."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from conftest import copy_onnx, tiny
from test_cli import road_export

import road_export as rx
from road_export.graph import files
from road_export.export import stream


def weights(path) -> dict[str, bytes]:
    """Initializer name -> (dtype, shape, bytes) of an ONNX file, external data read."""
    model = ir.load(path)
    return {k: (v.const_value.dtype, tuple(v.const_value.shape), v.const_value.tobytes())
            for k, v in model.graph.initializers.items()}


def differing(a: dict, b: dict) -> list[str]:
    return sorted(set(a) ^ set(b)) + sorted(k for k in set(a) & set(b) if a[k] != b[k])


@pytest.fixture(scope="module")
def adapted():
    model = tiny("tiny-llama")
    rx.get_road_model(model, rx.RoadConfig(variant="road_2", group_size=8, init_weights=False,
                                           target_modules=["q_proj", "v_proj", "down_proj", "lm_head"]))
    return model


@pytest.mark.parametrize("mode", ["merge", "rotate"])
def test_streaming_export_writes_the_in_memory_bytes(adapted, tmp_path, mode, monkeypatch):
    """Lazy weights saved to `.data` one at a time (transposes in blocks of a few rows) == merged copies and
    optimizer-folded transposes in one file."""
    monkeypatch.setattr(stream.TransposedTensor, "BLOCK_BYTES", 1000)  # several blocks per weight
    streamed = rx.export(adapted, tmp_path / "s.onnx", mode=mode, external_data=True)
    in_memory = rx.export(adapted, tmp_path / "m.onnx", mode=mode, streaming=False)
    assert streamed.external_data is not None and in_memory.external_data is None
    a, b = weights(streamed.path), weights(in_memory.path)
    assert differing(a, b) == []
    assert len(a) > 10


def test_the_comparison_sees_one_changed_byte(adapted, tmp_path):
    """Planted fault: one weight byte changed in one file is reported by name."""
    rx.export(adapted, tmp_path / "a.onnx", mode="merge", streaming=False)
    a = weights(tmp_path / "a.onnx")
    name = next(k for k, v in a.items() if len(v[2]) > 1000)
    b = dict(a)
    raw = bytearray(b[name][2])
    raw[17] ^= 1
    b[name] = (b[name][0], b[name][1], bytes(raw))
    assert differing(a, b) == [name]


def test_lazy_weights_pass_reads_no_weight(adapted):
    """The pass only rewires: no lazy tensor is evaluated until something asks for its bytes."""
    from road_export.export import capture, prepare

    merges: dict = {}
    with prepare.prepared(adapted, "merge", None, lazy_merges=merges) as prepared:
        module, args, names, spec, dynamic = capture.trace_plan(prepared, None, None, None)
        model = capture.torch_export(module, args, names, dynamic, None)
    lazy = stream.LazyWeightsPass(merges)
    lazy(model)
    assert lazy.evaluations == 0 and set(merges) == {p for p in merges}
    tensors = [v.const_value for v in model.graph.initializers.values() if isinstance(v.const_value, ir.LazyTensor)]
    assert len(tensors) == 2 * 7 + 1  # every linear's transposed weight (4 of them merged) and lm_head's
    assert not any(n.op_type == "Transpose" and n.inputs[0].is_initializer() for n in model.graph.all_nodes())
    tensors[0].tobytes()
    assert lazy.evaluations == 1


def test_external_data_is_chosen_by_size(tmp_path, monkeypatch):
    """Documented rule: initializers over files.EXTERNAL_DATA_THRESHOLD go to `<name>.onnx.data`."""
    model = ir.Model(ir.Graph([], [], nodes=[], name="g"), ir_version=10)
    value = ir.Value(name="w", const_value=ir.tensor(np.zeros((256, 256), np.float32)))
    model.graph.register_initializer(value)
    assert files.EXTERNAL_DATA_THRESHOLD == 256 * 2**20
    assert files.save_model(model, tmp_path / "small.onnx") is None
    monkeypatch.setattr(files, "EXTERNAL_DATA_THRESHOLD", 256 * 256 * 4 - 1)
    data = files.save_model(model, tmp_path / "big.onnx")
    assert data == tmp_path / "big.onnx.data" and data.stat().st_size >= 256 * 256 * 4
    assert weights(tmp_path / "big.onnx") == weights(tmp_path / "small.onnx")


@pytest.fixture(scope="module")
def bases(tmp_path_factory, plain_llama):
    """The same float base as one file and with external data, and a peft adapter for it."""
    import peft
    import torch

    root = tmp_path_factory.mktemp("scale")
    tiny("tiny-llama").save_pretrained(root / "base")
    torch.manual_seed(0)
    peft.get_peft_model(tiny("tiny-llama"), peft.RoadConfig(variant="road_4", group_size=8, init_weights=False)
                        ).save_pretrained(str(root / "adapter"))
    # rotate only: the tests read rotate_*.onnx (the merge_*.onnx files this also wrote were read by nothing since
    # attach's bases became plain_*, below: two exports saved)
    for name, extra in (("single", ()), ("external", ("--external-data",))):
        proc = road_export("--base", root / "base", "--adapter", root / "adapter", "--no-verify", *extra,
                           "--mode", "rotate", root / f"rotate_{name}.onnx")
        assert proc.returncode == 0, proc.stderr
    assert (root / "rotate_external.onnx.data").exists() and not (root / "rotate_single.onnx.data").exists()
    for name, external in (("single", False), ("external", True)):  # attach's bases: no adapter recorded in them
        copy_onnx(plain_llama(external), root / f"plain_{name}")  # plain_NAME/plain.onnx (+ .data)
    return root


@pytest.mark.parametrize("command", ["attach", "optimize"])
def test_attach_and_optimize_stream_the_same_bytes(bases, tmp_path, command):
    """From `.data` (weights copied by the kernel, folded ones computed one at a time while written) == from one
    file held in memory."""
    outs = {}
    for name in ("single", "external"):
        out = tmp_path / f"{name}.onnx"
        if command == "attach":
            argv = ["attach", bases / f"plain_{name}" / "plain.onnx", "--adapter", bases / "adapter", "--mode",
                    "merge", out]
        else:
            argv = ["optimize", bases / f"rotate_{name}.onnx", out, "--fold"]
        proc = road_export(*argv)
        assert proc.returncode == 0, proc.stderr
        outs[name] = out
    assert outs["external"].with_name("external.onnx.data").exists()
    assert differing(weights(outs["single"]), weights(outs["external"])) == []


def test_rewrite_in_place_is_refused_and_the_file_kept(bases, tmp_path):
    """BASE == OUT with external data: refused up front (inputs are left unchanged), the file and its `.data`
    byte-identical afterwards."""
    import shutil

    for suffix in ("", ".data"):  # the file names its data file: keep the names
        shutil.copy(bases / f"rotate_external.onnx{suffix}", tmp_path / f"rotate_external.onnx{suffix}")
    model = tmp_path / "rotate_external.onnx"
    before = [(model.with_name(model.name + s)).read_bytes() for s in ("", ".data")]
    proc = road_export("optimize", model, model, "--fold")
    assert proc.returncode == 2 and "is the input" in proc.stderr, proc.stderr
    assert [(model.with_name(model.name + s)).read_bytes() for s in ("", ".data")] == before


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("merged", [False, True])
def test_transposed_blocks_are_the_whole_tensor(monkeypatch, dtype, merged):
    """TransposedTensor.tofile (blocks of W's columns, merged per block) writes the bytes of W.T or (R W).T computed
    whole, for blocks that do and do not divide the width; a block merge that mixed columns would differ."""
    import io

    import torch

    from road_export.core import rotation
    from road_export.export.prepare import Merge

    torch.manual_seed(0)
    w = torch.randn(48, 200).to(getattr(torch, dtype))
    c1, c2 = torch.randn(48), torch.randn(48)
    merge = Merge(c1, c2, 16, 0) if merged else None
    whole = (merge.weight(w) if merged else w).T.contiguous().numpy().tobytes()
    if merged:  # the merge itself against the dense R @ W
        dense = rotation.dense_matrix(c1.double(), c2.double(), 16) @ w.double()
        assert torch.allclose(merge.weight(w).double(), dense, atol=1e-2 if dtype == "float16" else 1e-5)
    source = ir.tensor(w.numpy())
    for block_bytes, align in ((1000, 1), (1000, 64), (48 * 64 * w.element_size(), 64), (2**30, 64)):
        monkeypatch.setattr(stream.TransposedTensor, "BLOCK_BYTES", block_bytes)
        monkeypatch.setattr(stream.TransposedTensor, "BLOCK_ALIGN", align)
        calls = []
        tensor = stream.TransposedTensor(source, (200, 48), lambda: calls.append(1), merge)
        out = io.BytesIO()
        tensor.tofile(out)
        assert out.getvalue() == whole, (block_bytes, align)
        assert tensor.tobytes() == whole and len(calls) == 2


def test_release_model_frees_the_exported_weights(bases, tmp_path):
    """After the export, the CLI's Source drops its own model for peft's reference: the tensors are emptied in place,
    so a leftover holder (torch.export keeps its last trace's graph module) pins no weights; the reference, loaded
    on its own, still runs. A source whose reference is its own model keeps it."""
    import torch

    from road_export.export.source import load_source

    source = load_source(str(bases / "base"), [str(bases / "adapter")], defer_reference=True)
    rx.export(source.model, tmp_path / "m.onnx", mode="merge")
    held = list(source.model.parameters())  # as torch.export's leftover map holds them
    assert all(p.numel() for p in held)
    source.release_model()
    assert source.model is None and all(p.numel() == 0 for p in held)
    reference = source.reference_model
    ids = torch.tensor([[1, 5, 9]])
    with torch.no_grad():
        assert torch.isfinite(reference(input_ids=ids).logits).all()
    assert all(p.numel() for p in reference.parameters())

    embedded = load_source("default", [])  # no adapter directory: the reference is road-export's model itself
    kept = list(embedded.model.parameters())
    embedded.release_model()
    assert embedded.model is not None and embedded.reference_model is embedded.model and all(p.numel() for p in kept)


@pytest.mark.parametrize("mode,quantize", [("rotate", None), ("rotate", "int4"), ("merge", "int4")])
def test_model_freed_once_its_weights_are_written(bases, tmp_path, mode, quantize, monkeypatch):
    """`on_weights_read` (the CLI frees its model there on --no-verify) runs after the last weight is written and
    before onnxruntime's load check and the quantizer; the files (the swap file included) are byte for byte those
    of an export that kept its model to the end. Planted fault: the same release run before the weights are
    written leaves empty tensors, which the comparison sees."""
    from road_export.graph import quantize as quant
    from road_export.export import post
    from road_export.export.source import load_source

    events = []
    check, quantize_file = post.check_loadable, quant.quantize_file
    monkeypatch.setattr(post, "check_loadable", lambda p: events.append("check") or check(p))
    monkeypatch.setattr(quant, "quantize_file", lambda *a, **k: events.append("quantize") or quantize_file(*a, **k))
    paths = {}
    for name in ("kept", "freed", "too early"):
        source = load_source(str(bases / "base"), [str(bases / "adapter")], reference=False)
        path = tmp_path / name.replace(" ", "_") / "m.onnx"
        path.parent.mkdir()
        if name == "too early":  # the exporter's saves preceded by the release (its own and the shared tail's)
            from road_export.export import exporter, result

            free = source.release_model
            for module in (exporter, result):
                monkeypatch.setattr(module, "save_model",
                                    lambda *a, free=free, save=module.save_model, **k: (free(unverified=True),
                                                                                        save(*a, **k))[1])
        events.clear()
        release = (lambda s=source: (events.append("release"), s.release_model(unverified=True))) \
            if name == "freed" else None
        try:
            rx.export(source.model, path, mode=mode, quantize=quantize, on_weights_read=release)
        except Exception:  # the planted fault may also stop the export itself: caught either way
            paths[name] = None
            continue
        paths[name] = path
        if name == "freed":
            assert events[0] == "release" and source.model is None, events
            assert events[1:] == (["quantize", "check"] if quantize else ["check"])
    assert differing(weights(paths["kept"]), weights(paths["freed"])) == []
    swaps = sorted(p.name for p in paths["kept"].parent.glob("*.onnx_adapter"))
    assert swaps == (["m.default.onnx_adapter"] if mode == "rotate" else [])
    for swap in swaps:
        assert (paths["kept"].parent / swap).read_bytes() == (paths["freed"].parent / swap).read_bytes()
    assert paths["too early"] is None or differing(weights(paths["kept"]), weights(paths["too early"]))
