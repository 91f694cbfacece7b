"""Model directories that optimum, onnxruntime-genai and transformers.js load as they are; torch-free.

The layout is the one ONNX model repositories on the Hugging Face hub use (and optimum's `main_export` writes,
with the model under `onnx/` as transformers.js expects it):

    OUT_DIR/
      config.json               the base model's transformers config  (optimum, transformers.js)
      generation_config.json    transformers' generation defaults      (optimum, transformers.js)
      tokenizer.json ...        the base model's tokenizer files, copied when the base directory has them
      genai_config.json         onnxruntime-genai's config: decoder file, I/O names, head sizes, search defaults
      onnx/model.onnx           the exported graph (+ onnx/model.onnx.data with external data)
      onnx/model.<adapter>.onnx_adapter   rotate mode, one adapter: its swap file
      road_ort.so               rotate mode: the native road kernels built on this machine, for onnxruntime-genai

`write_model_dir` stages all of it in a temporary directory beside OUT_DIR and renames it into place through
`files.atomic_write`, so OUT_DIR appears whole or not at all. `model_file(path)` maps a directory to its
`onnx/model.onnx` (and a file to itself), so every command that reads a model also takes a directory.

The genai config follows onnxruntime-genai's reference (docs/genai/reference/config.md in microsoft/onnxruntime,
and src/config.cpp in microsoft/onnxruntime-genai): `model.type` is transformers' `model_type`,
`model.decoder.inputs/outputs` name the graph's I/O (`%d` stands for the layer), and `search.past_present_share_buffer`
is false because these graphs take a past of length P and return a present of length P + S (a shared buffer would
need present to alias a max-length past).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from road_export.errors import RoadError
from road_export.files import atomic_write, write_text_atomic

__all__ = [
    "CONFIG",
    "GENAI_CONFIG",
    "GENERATION_CONFIG",
    "MODEL_FILE",
    "TOKENIZER_FILES",
    "ModelDir",
    "genai_config",
    "is_dir_output",
    "is_model_dir",
    "model_file",
    "set_custom_ops_library",
    "tokenizer_files",
    "write_model_dir",
]

CONFIG, GENERATION_CONFIG, GENAI_CONFIG = "config.json", "generation_config.json", "genai_config.json"
MODEL_FILE = "onnx/model.onnx"  # transformers.js looks for onnx/model.onnx; optimum finds it by pattern
# what transformers' tokenizers save (PreTrainedTokenizer(Fast).save_pretrained) for the common tokenizer kinds
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "vocab.txt", "spiece.model", "chat_template.jinja",
                   "chat_template.json")
MODEL_SUFFIXES = (".onnx",)


def is_dir_output(path: str | os.PathLike) -> bool:
    """Whether an output path asks for a model directory: it does not end in `.onnx` and has no file-like suffix.

    `./llama-road`, `out/`, `llama-3.2-road` and an existing directory are directories; `model.txt` or `model.bin`
    (an alphabetic suffix) are taken as a mistyped file name, which the file path's checks refuse."""
    text = str(path)
    if text.endswith(MODEL_SUFFIXES):
        return False
    if text.endswith(("/", os.sep)) or Path(text).is_dir():
        return True
    suffix = Path(text).suffix[1:]
    return not (suffix.isalpha() and suffix.isascii())


def is_model_dir(path: str | os.PathLike) -> bool:
    """Whether `path` is a directory holding `onnx/model.onnx`."""
    path = Path(path)
    return path.is_dir() and (path / MODEL_FILE).is_file()


def model_file(path: str | os.PathLike) -> Path:
    """The ONNX file a command should read: `path/onnx/model.onnx` for a model directory, `path/model.onnx` for an
    onnxruntime-genai model builder directory (model.onnx beside genai_config.json), `path` itself otherwise.

    Raises RoadError for a directory without `onnx/model.onnx` (one line saying what is expected)."""
    path = Path(path)
    if path.is_dir():
        if not (path / MODEL_FILE).is_file():
            if (path / GENAI_CONFIG).is_file() and (path / "model.onnx").is_file():
                return path / "model.onnx"
            if any((path / sub / "encoder_model.onnx").is_file() for sub in (".", "onnx")):
                raise RoadError(f"{path}: is an encoder-decoder directory; this command takes one ONNX file: give "
                                "one of its files (e.g. onnx/decoder_model.onnx), or convert an adapter for every "
                                "file with road_export.seq2seq.convert_adapter")
            raise RoadError(f"{path}: is a directory without {MODEL_FILE}; give an ONNX file or a model directory "
                            "written by road-export")
        return path / MODEL_FILE
    return path


def tokenizer_files(base: str | os.PathLike | None) -> list[Path]:
    """The tokenizer files in a base model directory (none for a models/ name or a directory without them)."""
    if base is None or not Path(base).is_dir():
        return []
    return [Path(base) / name for name in TOKENIZER_FILES if (Path(base) / name).is_file()]


def _graph_io(onnx_path: Path) -> tuple[list[str], list[str], dict[str, list]]:
    """(input names, output names, {input name: dims}) of an ONNX file, external data not read."""
    import onnx

    proto = onnx.load(str(onnx_path), load_external_data=False)
    initializers = {t.name for t in proto.graph.initializer}
    inputs = [i for i in proto.graph.input if i.name not in initializers]
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in inputs}
    return [i.name for i in inputs], [o.name for o in proto.graph.output], dims


def genai_config(config: dict[str, Any], onnx_path: str | os.PathLike, *, filename: str = MODEL_FILE,
                 generation: dict[str, Any] | None = None, custom_ops_library: str | None = None) -> dict[str, Any]:
    """onnxruntime-genai's `genai_config.json` for a decoder with a KV cache exported by road-export.

    config: the base model's transformers config as a dict (model_type, vocab_size, num_hidden_layers,
    num_attention_heads, num_key_value_heads, hidden_size, head_dim, max_position_embeddings, token ids).
    onnx_path: the exported `text-generation-with-past` file; its inputs/outputs decide the I/O names (position_ids
    only when the graph takes it). generation: generation_config.json's dict, for the search defaults
    (do_sample, temperature, top_k, top_p, repetition_penalty, max_length). custom_ops_library: the native road
    kernel library's path relative to the directory (onnxruntime-genai loads custom-op libraries from within the
    model directory only), written to `model.decoder.session_options.custom_ops_library`.
    Raises RoadError when the file is not a decoder with past_key_values inputs.
    """
    inputs, outputs, dims = _graph_io(Path(onnx_path))
    if "input_ids" not in inputs or "past_key_values.0.key" not in inputs or "logits" not in outputs:
        raise RoadError(f"{onnx_path}: onnxruntime-genai needs a decoder with a key/value cache; export with "
                        "--task text-generation-with-past")
    generation = dict(generation or {})
    heads = int(config["num_attention_heads"])
    kv_heads = int(config.get("num_key_value_heads") or heads)
    hidden = int(config["hidden_size"])
    past_dims = dims["past_key_values.0.key"]
    head_size = past_dims[3] if isinstance(past_dims[3], int) and past_dims[3] else \
        int(config.get("head_dim") or hidden // heads)
    context = int(config.get("max_position_embeddings") or config.get("n_positions") or 2048)
    names = {"input_ids": "input_ids", "attention_mask": "attention_mask", "position_ids": "position_ids"}
    decoder_inputs = {key: name for key, name in names.items() if name in inputs}
    decoder_inputs.update({"past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"})
    session_options: dict[str, Any] = {"log_id": "onnxruntime-genai", "provider_options": []}
    if custom_ops_library:
        session_options["custom_ops_library"] = str(custom_ops_library)

    def token(key: str):
        value = generation.get(key, config.get(key))
        return value if value is not None else None

    model: dict[str, Any] = {
        "type": config["model_type"],
        "vocab_size": int(config["vocab_size"]),
        "context_length": context,
        "decoder": {
            "session_options": session_options,
            "filename": filename,
            "head_size": int(head_size),
            "hidden_size": hidden,
            "num_attention_heads": heads,
            "num_hidden_layers": int(config["num_hidden_layers"]),
            "num_key_value_heads": kv_heads,
            "inputs": decoder_inputs,
            "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                        "present_value_names": "present.%d.value"},
        },
    }
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = token(key)
        if value is not None:
            model[key] = value
    if "pad_token_id" not in model and "eos_token_id" in model:
        eos = model["eos_token_id"]
        model["pad_token_id"] = eos[0] if isinstance(eos, list) else eos
    search = {
        "do_sample": bool(generation.get("do_sample", False)),
        "max_length": int(generation.get("max_length") or context),
        "min_length": 0,
        "num_beams": 1,
        "num_return_sequences": 1,
        "past_present_share_buffer": False,
        "repetition_penalty": float(generation.get("repetition_penalty", 1.0)),
        "temperature": float(generation.get("temperature", 1.0)),
        "top_k": int(generation.get("top_k", 50)),
        "top_p": float(generation.get("top_p", 1.0)),
    }
    return {"model": model, "search": search}


def library_name(library: str | os.PathLike) -> str:
    """The kernel library's name inside a model directory: `road_ort` with the platform's suffix (.so, ...)."""
    return "road_ort" + Path(library).suffix


def set_custom_ops_library(directory: str | os.PathLike, library: str | os.PathLike | None) -> Path:
    """Copy the native kernel library into a model directory and name it in `genai_config.json`'s
    `model.decoder.session_options.custom_ops_library` (with None: remove the entry and the copy).

    For `road-export kernels --genai-config DIR`: the kernels are built per machine, and onnxruntime-genai loads a
    custom-op library only from within the model directory ("custom_ops_library path is not within an allowed
    directory" otherwise), so the library travels as a file of the directory. Returns the config's path.
    Raises RoadError when the directory has no genai_config.json or it is not one."""
    directory = Path(directory)
    path = directory / GENAI_CONFIG
    if not path.is_file():
        raise RoadError(f"{directory}: no {GENAI_CONFIG}; give a model directory written by road-export for a "
                        "decoder (task text-generation-with-past)")
    try:
        data = json.loads(path.read_text())
        options = data["model"]["decoder"].setdefault("session_options", {})
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise RoadError(f"{path}: not an onnxruntime-genai config ({type(e).__name__}: {e})") from e
    old = options.pop("custom_ops_library", None)
    if library is not None:
        name = library_name(library)
        with atomic_write(directory / name) as tmp:
            shutil.copyfile(library, tmp)
        options["custom_ops_library"] = name
    elif old and "/" not in old and (directory / old).is_file():
        (directory / old).unlink()
    write_text_atomic(path, json.dumps(data, indent=4) + "\n")
    return path


@dataclass
class ModelDir:
    """What `write_model_dir` wrote: the directory, its files (relative names) and `export`'s result."""

    path: Path
    files: list[str]
    result: Any
    staged: Path  # where the files were written before the rename (gone now); `final` maps paths from there

    def final(self, path: str | os.PathLike | None) -> Path | None:
        """A path under the staging directory (as `export` saw it) -> the same file under `self.path`."""
        if path is None:
            return None
        return self.path / Path(path).relative_to(self.staged)


def write_model_dir(directory: str | os.PathLike, export: Callable[[Path], Any], *, config: dict[str, Any],
                    generation: dict[str, Any] | None = None, tokenizer_dir: str | os.PathLike | None = None,
                    custom_ops_library: str | None = None) -> ModelDir:
    """Write a model directory at `directory` atomically: `export(onnx path)` writes `onnx/model.onnx` (and
    whatever goes beside it), then the configs and tokenizer files are added and the whole renamed into place.

    config/generation: transformers' config and generation config as dicts (written as config.json and
    generation_config.json). tokenizer_dir: the base model directory, whose tokenizer files are copied. The
    genai config is written when the graph is a decoder with a cache. Paths in `export`'s result point into the
    staging directory; `ModelDir.final` maps them. Raises RoadError when `directory` exists and is not empty or
    cannot be written; on any failure or interruption nothing is left at `directory`.
    """
    directory = Path(directory)
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise RoadError(f"{directory}: exists and is not empty; choose a new directory for the model")
    with atomic_write(directory) as tmp:
        (tmp / "onnx").mkdir(parents=True)
        result = export(tmp / MODEL_FILE)
        (tmp / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        (tmp / GENERATION_CONFIG).write_text(json.dumps(generation or {}, indent=2, sort_keys=True) + "\n")
        for file in tokenizer_files(tokenizer_dir):
            shutil.copyfile(file, tmp / file.name)
        # an encoder-decoder export writes onnx/encoder_model.onnx, ... instead (no genai config: a decoder only)
        inputs, outputs, _ = _graph_io(tmp / MODEL_FILE) if (tmp / MODEL_FILE).is_file() else ([], [], {})
        if "past_key_values.0.key" in inputs and "logits" in outputs:
            library = None
            if custom_ops_library is not None:
                library = library_name(custom_ops_library)
                shutil.copyfile(custom_ops_library, tmp / library)
            genai = genai_config(config, tmp / MODEL_FILE, generation=generation, custom_ops_library=library)
            (tmp / GENAI_CONFIG).write_text(json.dumps(genai, indent=4) + "\n")
        files = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())
    return ModelDir(directory, files, result, tmp)
