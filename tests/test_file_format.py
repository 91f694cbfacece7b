"""The metadata keys road-export writes into ONNX files are a file format: files written by one version are read by
the next, so a key never changes with the code's module paths (a relayout once rewrote "road_export.quantize" into
"road_export.graph.quantize" because the key looked like a module name; files quantized before no longer read)."""

from __future__ import annotations

from types import ModuleType

import pytest

from road_export.core import names
from road_export.graph import inspection, quantize

# The keys as files hold them (docs/onnx-ops.md, docs/quantization.md, docs/generation.md): never rename one.
FILE_KEYS = {
    "METADATA_VERSION": "road_export.version",
    "METADATA_MODE": "road_export.mode",
    "METADATA_TASK": "road_export.task",
    "METADATA_ADAPTERS": "road_export.adapters",
    "METADATA_SEQ2SEQ": "road_export.seq2seq",
    "METADATA_SWAP": "road_export.swap",
    "METADATA_QUANTIZE": "road_export.quantize",
    "METADATA_ROPE": "road_export.rope",
    "METADATA_GRAPH": "road_export.graph",
}


def changed_keys(module: ModuleType) -> dict[str, tuple[str, str]]:
    """{constant: (expected key, the module's value)} for each file-format key `module` defines differently."""
    return {name: (key, getattr(module, name)) for name, key in FILE_KEYS.items()
            if hasattr(module, name) and getattr(module, name) != key}


@pytest.mark.parametrize("module", [names, inspection, quantize], ids=lambda m: m.__name__)
def test_the_metadata_keys_files_hold_do_not_change(module):
    assert not changed_keys(module)


def test_every_metadata_constant_is_a_known_file_key():
    """A new key joins FILE_KEYS (and the docs) when it is added, so it is frozen from its first file on."""
    declared = {n for n in vars(names) if n.startswith("METADATA_") and n != "METADATA_PREFIX"}
    assert declared == set(FILE_KEYS), declared ^ set(FILE_KEYS)


def test_a_renamed_key_is_caught(monkeypatch):
    """A check that can fail: the relayout's rewrite, planted back."""
    monkeypatch.setattr(quantize, "METADATA_QUANTIZE", "road_export.graph.quantize")
    assert changed_keys(quantize) == {"METADATA_QUANTIZE": ("road_export.quantize", "road_export.graph.quantize")}
