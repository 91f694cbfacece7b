"""The application layer from Python (road_export.app.application) and the error kinds with their exit codes
(road_export.core.errors, cli_common.failure): each kind is seen through a planted fault."""

from __future__ import annotations

import re
import signal

import onnx
import peft
import pytest
import torch
from conftest import tiny

import road_export
from road_export.app import application
from road_export.app.cli import main
from road_export.app.cli_common import failure
from road_export.core.errors import (
    ExportBug, OnnxRuntimeFailure, ParityFailure, RoadError, onnxruntime_blame, onnxruntime_errors, onnxruntime_line)


def run(*args) -> int:
    return main([str(a) for a in args])


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A saved tiny Llama base and two peft RoAd adapters for it (different parameters)."""
    root = tmp_path_factory.mktemp("application")
    tiny("tiny-llama").save_pretrained(root / "base")
    for name, seed in (("road", 0), ("other", 1)):
        torch.manual_seed(seed)
        model = peft.get_peft_model(tiny("tiny-llama"), peft.RoadConfig(variant="road_1", group_size=8,
                                                                         init_weights=False))
        model.save_pretrained(str(root / name))
    return root


@pytest.fixture(scope="module")
def exported(llama):
    """A rotate export through the Python API, with the steps it reported and the SIGTERM handler around it."""
    steps: list[str] = []
    before = signal.getsignal(signal.SIGTERM)
    result = road_export.export_verified(
        road_export.ExportOptions(llama / "rotate.onnx", base=str(llama / "base"), adapters=(str(llama / "road"),),
                                  mode="rotate", report=str(llama / "rotate.json")), on_step=steps.append)
    return result, steps, before, signal.getsignal(signal.SIGTERM)


def test_export_verified_from_python(llama, exported):
    """`road_export.export_verified` is the CLI's export: checked, exported, verified against peft's forward, the
    report written, committed; the job's own signal handlers are gone afterwards."""
    result, steps, before, after = exported
    assert result.passed and result.report.passed and result.kind == "file"
    assert result.report.reference.startswith("peft"), result.report.reference
    assert (llama / "rotate.onnx").is_file() and (llama / "rotate.default.onnx_adapter").is_file()
    assert (llama / "rotate.json").is_file()
    assert result.summary.startswith(f"wrote {llama / 'rotate.onnx'} (rotate, float32, adapters: default")
    assert steps[0] == "loading" and "tracing" in steps and steps[-1] == "verifying", steps
    assert before is after  # Interruptions restored the caller's handler


def test_bad_input_before_anything_is_loaded(llama, monkeypatch):
    """ExportJob.check refuses bad options before loading: planted, a loader that would fail the test."""
    from road_export.export import source

    monkeypatch.setattr(source, "load_source", lambda *a, **k: pytest.fail("loaded before the checks"))
    for options, says in (
            (application.ExportOptions(llama / "x.onnx", verify=False, report=str(llama / "r.json")),
             "--report needs the parity check"),
            (application.ExportOptions(llama / "x.onnx", adapters=("a=x", "b=y")), "cannot be merged"),
            (application.ExportOptions(llama / "x.onnx", fixed=True), "--fixed applies to --mode rotate only"),
            (application.ExportOptions(llama / "x.onnx", base=str(llama / "base"), adapters=(str(llama / "road"),),
                                       mode="rotate", report=str(llama / "x.onnx")), "--report")):
        with pytest.raises(RoadError, match=says):
            road_export.export_verified(options)
    assert not (llama / "x.onnx").exists()


def test_parity_failure_is_exit_1(llama, monkeypatch, capsys):
    """Planted fault: peft's reference is built with the other adapter, so the export's parity fails:
    export_verified raises ParityFailure (the report on it, the files written), the CLI exits 1."""
    from road_export.export import source as source_module

    real = source_module.peft_reference

    def other_reference(base_model, specs):
        return real(base_model, [source_module.parse_adapter(str(llama / "other"), 0)])

    monkeypatch.setattr(source_module, "peft_reference", other_reference)
    options = application.ExportOptions(llama / "bad.onnx", base=str(llama / "base"),
                                        adapters=(str(llama / "road"),))
    with pytest.raises(ParityFailure, match="parity FAILED") as caught:
        road_export.export_verified(options)
    assert not caught.value.report.passed and (llama / "bad.onnx").is_file()
    assert failure(caught.value) == (f"error: {caught.value}", 1)
    assert run("--base", llama / "base", "--adapter", llama / "road", llama / "bad2.onnx") == 1
    assert "parity FAILED" in capsys.readouterr().out


def test_torch_export_failure_is_exit_3_naming_the_traced_model(llama, monkeypatch, capsys):
    """Planted fault: torch's exporter raises on a model road-export takes: ExportBug naming the traced class,
    exit 3 in one line, nothing written."""
    def broken(*args, **kwargs):
        raise RuntimeError("planted exporter failure")

    monkeypatch.setattr(torch.onnx, "export", broken)
    out = llama / "traced.onnx"
    with pytest.raises(ExportBug, match="tracing LlamaForCausalLM.*planted exporter failure"):
        road_export.export_verified(application.ExportOptions(out, base=str(llama / "base"), no_adapter=True,
                                                              verify=False))
    capsys.readouterr()
    assert run("--base", llama / "base", "--no-adapter", "--no-verify", out) == 3
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("road-export: internal error: ExportBug: torch.onnx.export "
                                                   "failed tracing LlamaForCausalLM"), lines
    assert not out.exists()


def test_translation_failure_is_exit_3_naming_the_step(llama, monkeypatch, capsys):
    """Planted fault: a post-export pass (the metadata pass, after tracing) raises KeyError: ExportBug naming the
    model class and the step, exit 3 in one line, nothing written. Without the job's wrapper it would be a bare
    "KeyError: 'planted'" with nothing said of what was being exported."""
    from road_export.export import post

    def broken(self, model):
        raise KeyError("planted")

    monkeypatch.setattr(post.MetadataPass, "call", broken)
    out = llama / "translated.onnx"
    assert run("--base", llama / "base", "--no-adapter", "--no-verify", out) == 3
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("road-export: internal error: ExportBug: exporting LlamaForCausalLM from "), lines
    assert "failed at step " in lines[0] and "KeyError: 'planted'" in lines[0], lines
    assert not out.exists()


def test_onnxruntime_failures_are_one_line_with_the_cause(tmp_path):
    """A corrupt ONNX file: onnxruntime's own exception (recognised by class, not by module name) becomes
    OnnxRuntimeFailure "PATH: onnxruntime cannot load it (CAUSE)", exit 2; other exceptions pass unchanged."""
    import onnxruntime

    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"\x08\x07\x12\x00garbage, not a protobuf")
    with pytest.raises(OnnxRuntimeFailure) as caught:
        with onnxruntime_blame(corrupt, "load"):
            onnxruntime.InferenceSession(str(corrupt), providers=["CPUExecutionProvider"])
    message = str(caught.value)
    assert message.startswith(f"{corrupt}: onnxruntime cannot load it (") and "\n" not in message, message
    assert isinstance(caught.value.__cause__, onnxruntime_errors())
    assert failure(caught.value) == (f"error: {message}", 2)
    with pytest.raises(KeyError):  # not onnxruntime's: unchanged
        with onnxruntime_blame(corrupt, "load"):
            raise KeyError("x")
    fail = onnxruntime.capi.onnxruntime_pybind11_state.Fail("first line\n  node details\n  stack")
    assert onnxruntime_line(fail) == "first line"
    assert failure(fail) == ("error: onnxruntime refused the input: first line", 2)
    assert failure(KeyError("planted"))[1] == 3 and failure(RoadError("bad"))[1] == 2


def test_onnxruntime_run_failure_in_verify(llama, exported, monkeypatch):
    """Planted fault: onnxruntime's run fails while verifying: one line naming the file and onnxruntime's cause,
    exit 2 (verify_model from Python raises OnnxRuntimeFailure or RoadError with that line)."""
    import onnxruntime

    def failing(self, *args, **kwargs):
        raise onnxruntime.capi.onnxruntime_pybind11_state.Fail("planted run failure\n  at node X")

    monkeypatch.setattr(onnxruntime.InferenceSession, "run", failing)
    options = application.VerifyOptions(llama / "rotate.onnx", base=str(llama / "base"),
                                        adapters=(str(llama / "road"),))
    with pytest.raises(RoadError, match=r"rotate.onnx: onnxruntime cannot run it \(.*planted run failure"):
        application.verify_model(options)


def test_verify_model_reports_a_damaged_file(llama, exported):
    """verify_model against peft's forward: the intact export passes; planted fault, one weight row scaled in a
    copy, fails (report.passed False: the CLI's exit 1)."""
    from onnx import numpy_helper

    options = application.VerifyOptions(llama / "rotate.onnx", base=str(llama / "base"),
                                        adapters=(str(llama / "road"),))
    assert application.verify_model(options).passed
    model = onnx.load(str(llama / "rotate.onnx"))
    init = next(i for i in model.graph.initializer if "embed_tokens" in i.name)
    table = numpy_helper.to_array(init).copy()
    table[:, :4] *= 3
    init.CopyFrom(numpy_helper.from_array(table, init.name))
    damaged = llama / "damaged.onnx"
    onnx.save(model, str(damaged))
    for adapter in (llama / "rotate.default.onnx_adapter",):  # the swap file goes with the copy
        (llama / "damaged.default.onnx_adapter").write_bytes(adapter.read_bytes())
    report = application.verify_model(application.VerifyOptions(damaged, base=str(llama / "base"),
                                                                adapters=(str(llama / "road"),)))
    assert not report.passed


def test_attach_translation_failure_is_exit_3(llama, tmp_path, monkeypatch, capsys):
    """Planted fault: the translation of the adapter onto the graph (attach.attach_to_model) raises KeyError:
    ExportBug naming the adapter and the base, exit 3 in one line, no output left."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    from road_export.passes import attach

    weight = numpy_helper.from_array(np.ones((4, 4), np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [weight])
    base = tmp_path / "base.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(base))

    def broken(*args, **kwargs):
        raise KeyError("planted")

    monkeypatch.setattr(attach, "attach_to_model", broken)
    out = tmp_path / "out.onnx"
    with pytest.raises(ExportBug, match=r"attaching .*road to .*base.onnx failed: KeyError: 'planted'"):
        application.attach_adapters(application.AttachOptions(base, (llama / "road",), out))
    capsys.readouterr()
    assert run("attach", base, "--adapter", llama / "road", out) == 3
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("road-export: internal error: ExportBug: attaching "), lines
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["base.onnx"]


@pytest.mark.parametrize(("options", "says"), [
    (dict(seed=-1), "--seed -1: must be an integer >= 0"),
    (dict(seed=2**63), f"--seed {2**63}: must be an integer >= 0"),  # beyond torch's int64 seeds (SEED_LIMIT)
    (dict(graph="bogus"), "--graph 'bogus': choose one of road, builder, auto"),
    (dict(atol=float("nan")), "--atol nan: must be a finite number >= 0"),
    (dict(atol=-1.0), "--atol -1.0: must be a finite number >= 0"),
    (dict(opset=7), "--opset 7: not supported; choose 18 to 25"),
    (dict(mode="rotat"), "--mode 'rotat': choose one of merge, rotate"),
    (dict(dtype="float64"), "--dtype 'float64': choose one of float32, float16, bfloat16"),
    (dict(quantize="int3"), "--quantize 'int3': choose one of int4, int8"),
])
def test_python_options_are_checked_as_the_cli_checks_them(tmp_path, monkeypatch, options, says):
    """The values the CLI's parser refuses are refused from Python too, by the job's check, before anything loads."""
    from road_export.export import source

    monkeypatch.setattr(source, "load_source", lambda *a, **k: pytest.fail("loaded before the checks"))
    with pytest.raises(RoadError, match=re.escape(says)):
        road_export.export_verified(application.ExportOptions(tmp_path / "x.onnx", **options))
    assert list(tmp_path.iterdir()) == []


def test_verify_options_are_checked_too(tmp_path):
    with pytest.raises(RoadError, match=re.escape("--atol -1: must be a finite number >= 0")):
        application.verify_model(application.VerifyOptions(tmp_path / "x.onnx", atol=-1))


def test_one_builder_option_given_as_a_string_is_one_option():
    assert application.ExportOptions("d", builder_options="fuse_qkv=false").builder_options == ("fuse_qkv=false",)
