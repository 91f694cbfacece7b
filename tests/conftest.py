"""Shared fixtures: tiny models from models/ built with fixed seeds; nothing is downloaded."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch

from road_export.export import zoo


def tiny(name: str, seed: int = 0) -> torch.nn.Module:
    """A tiny model from models/<name>, weights from `seed`."""
    return zoo.load_model(name, seed=seed)


def token_inputs(model: torch.nn.Module, batch: int = 2, seq: int = 5, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, model.config.vocab_size, (batch, seq), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def perturbing(load, amount: float):
    """A planted loader fault: `load` (zoo.load_model) whose model gets `amount` added to layer 0's q_proj weight."""
    def faulty(*args, **kwargs):
        model = load(*args, **kwargs)
        with torch.no_grad():
            model.model.layers[0].self_attn.q_proj.weight.add_(amount)
        return model

    return faulty


def first_output(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    for key in ("logits", "last_hidden_state"):
        if key in out:
            return out[key]
    return out[0]


_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _python_sigint() -> None:
    """A suite started in the background by a non-interactive shell (`cmd &`, nohup) inherits SIGINT ignored, and
    Python then leaves it ignored; the CLI's interruption tests model a terminal's Ctrl-C, which a command started
    in the foreground gets. Python's own handler, as an interactive run has it (children inherit the default)."""
    import signal

    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


_python_sigint()


@pytest.fixture(autouse=True)
def signal_handlers_restored(request):
    """Each test starts with the process's SIGINT and SIGTERM handlers as the suite found them, whatever a previous
    test left: the CLI's in-process tests expect Python's own SIGINT handler (the CLI takes SIGINT over only from it,
    as a real process starts with it). A test that leaves other handlers behind is named in a warning."""
    import signal
    import warnings

    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    yield
    for sig, handler in saved.items():
        now = signal.getsignal(sig)
        if now is not handler:
            warnings.warn(f"{request.node.nodeid} left the {signal.Signals(sig).name} handler {now!r}; restored",
                          stacklevel=1)
            signal.signal(sig, handler)


@pytest.fixture(scope="session", autouse=True)
def repository_root_untouched():
    """Tests write under tmp_path only: a file that appears in the repository root during the run fails the session
    (a library that writes beside the current directory, e.g. external data, must run under monkeypatch.chdir)."""
    before = set(os.listdir(_ROOT))
    yield
    appeared = sorted(set(os.listdir(_ROOT)) - before - {".pytest_cache", ".hypothesis", "__pycache__"})
    assert not appeared, f"tests wrote into the repository root: {appeared}"


@pytest.fixture
def tmp_dir(tmp_path):
    return tmp_path


def copy_onnx(path, directory):
    """Copy an ONNX file and its external data (`NAME.data`, the name the file records) into `directory`; returns the
    copy's path. Shared session exports are read-only: a test that needs the file in its own directory copies it."""
    import shutil
    from pathlib import Path

    path, directory = Path(path), Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for source in (path, path.with_name(path.name + ".data")):
        if source.exists():
            shutil.copy(source, directory / source.name)
    return directory / path.name


def built_once(tmp_path_factory, name: str, build) -> Path:
    """`build(directory)` run once per test run, however many pytest-xdist workers run it (`pytest -n 2`, the
    README's test command): the first worker to ask builds into a directory every worker shares (the parent of the
    workers' base temps), under a file lock, and marks it done; the others wait on the lock and reuse it. Without
    xdist it is the session's own temp directory. Returns the directory; a failed build leaves no mark, so the next
    asker builds again (and fails the same way, in its own test)."""
    from filelock import FileLock

    base = tmp_path_factory.getbasetemp()
    root = Path(base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "built-once"
    root.mkdir(exist_ok=True)
    directory, done = root / name, root / f"{name}.done"
    with FileLock(str(root / f"{name}.lock")):
        if not done.exists():
            import shutil

            shutil.rmtree(directory, ignore_errors=True)
            directory.mkdir()
            build(directory)
            done.touch()
    return directory


@pytest.fixture(scope="session")
def plain_llama(tmp_path_factory):
    """`plain_llama(external_data)`: tiny-llama (seed 0) exported without adapter (`require_adapter=False`, merge),
    as `plain.onnx` (+ `plain.onnx.data` with external data), each exported once per test run (`built_once`: every
    export costs CI seconds; several files need this base for attach/optimize/quantize). Read-only: copy it with
    `copy_onnx`."""
    def get(external_data: bool = False):
        name = "external" if external_data else "single"
        return built_once(tmp_path_factory, f"plain_llama-{name}",
                          lambda d: _export_plain_llama(d / "plain.onnx", external_data)) / "plain.onnx"

    return get


def _export_plain_llama(path, external_data: bool) -> None:
    import road_export as rx

    rx.export(tiny("tiny-llama"), path, require_adapter=False, external_data=external_data or None)


def plain_llama_in(root):
    """The `plain_llama` getter writing under `root` (a Path), for tools/bad_input_cases.py (no pytest there)."""
    done: dict = {}

    def get(external_data: bool = False):
        if external_data not in done:
            path = root / ("external" if external_data else "single") / "plain.onnx"
            path.parent.mkdir(parents=True)
            _export_plain_llama(path, external_data)
            done[external_data] = path
        return done[external_data]

    return get


def word_tokenizer(directory, vocab: int) -> None:
    """A word-level tokenizer ("<unk>" 0, "<s>" 1, "</s>" 2, "w3".."w{vocab-1}") trained offline, saved by
    transformers' PreTrainedTokenizerFast into `directory` (what onnxruntime-genai's model builder copies)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab)}}
    tok = Tokenizer(models.WordLevel(vocab=words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                            pad_token="<unk>").save_pretrained(directory)


def genai_build(hf, out, precision: str, *extra: str):
    """`python -m onnxruntime_genai.models.builder -i HF -o OUT -p PRECISION -e cpu` (its cache beside OUT); returns
    OUT, the directory holding model.onnx and genai_config.json. A failed build fails the test with its output."""
    import subprocess
    import sys
    from pathlib import Path

    out = Path(out)
    done = subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(out),
                           "-p", precision, "-e", "cpu", "-c", str(out.parent / f"cache-{out.name}"), *extra],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return out


@pytest.fixture(scope="session")
def builder_llama(tmp_path_factory):
    """{"hf", "fp32", "int4"}: tiny-llama (seed 0) saved by transformers with `word_tokenizer`, and its fp32 and int4
    graphs built by onnxruntime-genai's model builder (`-e cpu`), built once per session: test_builder.py and
    test_builder_graphs.py both start from these (each build is a subprocess importing torch and the builder).
    Read-only: a test that changes a file copies the directory first."""
    pytest.importorskip("onnxruntime_genai")

    def build(root):
        model = tiny("tiny-llama")
        model.save_pretrained(root / "hf")
        word_tokenizer(root / "hf", model.config.vocab_size)
        for precision in ("fp32", "int4"):
            genai_build(root / "hf", root / precision, precision)

    root = built_once(tmp_path_factory, "builder_llama", build)
    return {"hf": root / "hf", **{precision: root / precision for precision in ("fp32", "int4")}}
