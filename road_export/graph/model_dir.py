"""Model directories that optimum, onnxruntime-genai and transformers.js load as they are; torch-free.

The layout is the one ONNX model repositories on the Hugging Face hub use (and optimum's `main_export` writes,
with the model under `onnx/` as transformers.js expects it):

    OUT_DIR/
      config.json               the base model's transformers config  (optimum, transformers.js)
      generation_config.json    transformers' generation defaults      (optimum, transformers.js)
      tokenizer.json ...        the base model's tokenizer files, copied when the base directory has them (a
                                tokenizer_class transformers 4.x lacks written as PreTrainedTokenizerFast)
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

A longrope file (Phi-3; its `road_export.rope` record) gets `search.max_length` capped at the rope switch
(`original_max_position_embeddings`): onnxruntime-genai 0.18 keeps every cached key when a sequence passes the switch
(its own builder's Phi-3 graphs pick the long cos/sin caches from the attention mask's length, for the new tokens
only), while transformers' Phi-3 generation re-runs the whole sequence with the long factors; up to the switch both
generate the same tokens. A caller who raises `max_length` gets genai's behaviour past it, not peft's.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from road_export.core.errors import RoadError
from road_export.graph.files import atomic_write, read_json_object, write_text_atomic

__all__ = [
    "CONFIG",
    "GENAI_CONFIG",
    "GENAI_KEYS",
    "GENERATION_CONFIG",
    "MODEL_FILE",
    "TOKENIZER_FILES",
    "ModelDir",
    "config_fields",
    "genai_config",
    "portable_tokenizer_config",
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
                                "file with road_export.runtime.seq2seq.convert_adapter")
            raise RoadError(f"{path}: is a directory without {MODEL_FILE}; give an ONNX file or a model directory "
                            "written by road-export")
        return path / MODEL_FILE
    return path


def tokenizer_files(base: str | os.PathLike | None) -> list[Path]:
    """The tokenizer files in a base model directory (none for a models/ name or a directory without them)."""
    if base is None or not Path(base).is_dir():
        return []
    return [Path(base) / name for name in TOKENIZER_FILES if (Path(base) / name).is_file()]


def _longrope_switch(onnx_path: Path) -> int | None:
    """The longrope switch of a road-export file (its `road_export.rope` record), None for any other file."""
    import onnx

    from road_export.core.names import METADATA_ROPE

    proto = onnx.load(str(onnx_path), load_external_data=False)
    record = next((p.value for p in proto.metadata_props if p.key == METADATA_ROPE), None)
    try:
        value = json.loads(record).get("original_max_position_embeddings") if record else None
    except (ValueError, AttributeError):
        return None
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


# what transformers 4.x and 5 both load for a tokenizer kept whole in tokenizer.json
PORTABLE_TOKENIZER_CLASS = "PreTrainedTokenizerFast"


def portable_tokenizer_config(path: Path) -> str | None:
    """Rewrite `tokenizer_config.json` at `path` (a copy inside a model directory) so that optimum's transformers
    (< 4.58) loads it as well as transformers 5 does: a `tokenizer_class` 4.x cannot resolve
    (`legacy_tokenizers.legacy_resolves`, e.g. transformers 5's "TokenizersBackend") becomes
    PreTrainedTokenizerFast where tokenizer.json sits beside it (both versions load that class from it: the same
    tokenizer, the same ids); other names and the rest of the file stay as they are. Returns the class name it
    replaced, else None. An unreadable file is left alone (the client's error names it)."""
    from road_export.core.legacy_tokenizers import legacy_resolves

    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    name = data.get("tokenizer_class") if isinstance(data, dict) else None
    if not isinstance(name, str) or legacy_resolves(name) or not (path.parent / "tokenizer.json").is_file():
        return None
    data["tokenizer_class"] = PORTABLE_TOKENIZER_CLASS
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    return name


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

    config: the base model's config values by their canonical names (`config_fields`: GENAI_KEYS read through the
    transformers config class; config.json's raw dict misses aliased keys such as GPT-2's `n_head`). The cache
    layout (kv heads, head size, layers) is read off the graph's past inputs where they are fixed.
    onnx_path: the exported `text-generation-with-past` file; its inputs/outputs decide the I/O names (position_ids
    only when the graph takes it). generation: generation_config.json's dict, for the search defaults
    (do_sample, temperature, top_k, top_p, repetition_penalty, max_length). custom_ops_library: the native road
    kernel library's path relative to the directory (onnxruntime-genai loads custom-op libraries from within the
    model directory only), written to `model.decoder.session_options.custom_ops_library`.
    Raises RoadError when the file is not a decoder with past_key_values inputs, when a value genai needs is missing
    from `config`, or a token id lies outside the vocabulary (onnxruntime-genai would refuse the directory).
    """
    inputs, outputs, dims = _graph_io(Path(onnx_path))
    switch = _longrope_switch(Path(onnx_path))
    if "input_ids" not in inputs or "past_key_values.0.key" not in inputs or "logits" not in outputs:
        raise RoadError(f"{onnx_path}: onnxruntime-genai needs a decoder with a key/value cache; export with "
                        "--task text-generation-with-past")
    generation = dict(generation or {})
    get = config.get
    heads = _required(get, "num_attention_heads", onnx_path)
    hidden = _required(get, "hidden_size", onnx_path)
    past_dims = dims["past_key_values.0.key"]
    # the graph's own cache layout first ([batch, kv_heads, past, head_dim]), the config's where a dim is symbolic
    fixed = lambda i: past_dims[i] if len(past_dims) == 4 and isinstance(past_dims[i], int) and past_dims[i] \
        else None  # noqa: E731
    kv_heads = fixed(1) or int(get("num_key_value_heads") or heads)
    head_size = fixed(3) or int(get("head_dim") or hidden // heads)
    layers = sum(1 for name in inputs if name.startswith("past_key_values.") and name.endswith(".key")) or \
        _required(get, "num_hidden_layers", onnx_path)
    context = int(get("max_position_embeddings") or get("n_positions") or 2048)
    names = {"input_ids": "input_ids", "attention_mask": "attention_mask", "position_ids": "position_ids"}
    decoder_inputs = {key: name for key, name in names.items() if name in inputs}
    decoder_inputs.update({"past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"})
    session_options: dict[str, Any] = {"log_id": "onnxruntime-genai", "provider_options": []}
    if custom_ops_library:
        session_options["custom_ops_library"] = str(custom_ops_library)

    def token(key: str):
        value = generation.get(key, get(key))
        return value if value is not None else None

    model: dict[str, Any] = {
        "type": genai_type(str(get("model_type")), onnx_path),
        "vocab_size": _required(get, "vocab_size", onnx_path),
        "context_length": context,
        "decoder": {
            "session_options": session_options,
            "filename": filename,
            "head_size": int(head_size),
            "hidden_size": hidden,
            "num_attention_heads": heads,
            "num_hidden_layers": layers,
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
    vocab = model["vocab_size"]
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):  # onnxruntime-genai refuses the directory else
        ids = model.get(key)
        outside = [i for i in (ids if isinstance(ids, list) else [ids]) if isinstance(i, int) and not 0 <= i < vocab]
        if outside:
            raise RoadError(f"{onnx_path}: onnxruntime-genai needs {key} within the vocabulary, the model's config "
                            f"gives {outside[0]} with vocab_size {vocab}; set {key} in the base's config.json "
                            "(or generation_config.json), or export to a .onnx file instead of a model directory")
    if "pad_token_id" not in model and "eos_token_id" in model:
        eos = model["eos_token_id"]
        model["pad_token_id"] = eos[0] if isinstance(eos, list) else eos
    search = {
        "do_sample": bool(generation.get("do_sample", False)),
        "max_length": min(int(generation.get("max_length") or context), switch or context),
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


# the config values genai_config.json is written from, by their canonical transformers names
GENAI_KEYS = ("model_type", "vocab_size", "hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim",
              "num_hidden_layers", "max_position_embeddings", "bos_token_id", "eos_token_id", "pad_token_id")


def config_fields(read: Callable[[str], Any]) -> dict[str, Any]:
    """{key: read(key)} for GENAI_KEYS, None values left out. `read` is `getattr` on the model's transformers config
    object (the caller's, this module stays torch- and transformers-free): through the config class, so
    `attribute_map` aliases resolve (GPT-2 `n_head`/`n_layer`/`n_embd`/`n_positions`, GPT-Neo `num_heads`/
    `num_layers`, Bloom `n_head`/`n_layer`, Falcon, GPT-J, ...) and keys a diff-saved config.json leaves out take
    the class's defaults, as `AutoConfig.from_pretrained` gives them; config.json's own dict does neither."""
    out = {}
    for key in GENAI_KEYS:
        try:
            value = read(key)
        except AttributeError:
            value = None
        if value is not None:
            out[key] = value
    return out


def _required(get: Callable[[str], Any], key: str, onnx_path) -> int:
    value = get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise RoadError(f"{onnx_path}: onnxruntime-genai's config needs {key}, which the model's config does not "
                        f"give (got {value!r}); export to a .onnx file instead of a model directory")
    return value


# The decoder-only model types onnxruntime-genai runs by name (its src/models/model_type.h, `LLM`); any other
# decoder is declared as the generic "decoder", whose I/O genai_config.json names in full. Not "gpt2": genai runs
# that type with GPT-2's old combined past inputs, which road-export's files do not have ("Model input was not found").
GENAI_TYPES = ("chatglm", "decoder", "ernie4_5", "gemma", "gemma2", "gemma3_text", "gptoss", "granite",
               "llama", "mistral", "nemotron", "olmo", "phi", "phimoe", "phi3", "phi3small", "qwen2", "qwen3",
               "smollm3")  # those of onnxruntime-genai 0.18 that are plain decoders


def genai_type(model_type: str, onnx_path) -> str:
    """genai_config.json's `model.type` for a transformers `model_type`: itself where onnxruntime-genai knows it,
    else "decoder" (the generic decoder-only type)."""
    return model_type if model_type in GENAI_TYPES else "decoder"


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
    fix = "export the model directory again with road-export"
    data = read_json_object(path, fix)
    model = data.get("model")
    decoder = model.get("decoder") if isinstance(model, dict) else None
    options = decoder.setdefault("session_options", {}) if isinstance(decoder, dict) else None
    if not isinstance(options, dict):
        raise RoadError(f"{path}: not an onnxruntime-genai config (no model.decoder.session_options object); {fix}")
    old = options.pop("custom_ops_library", None)
    if library is not None:
        name = library_name(library)
        with atomic_write(directory / name) as tmp:
            shutil.copyfile(library, tmp)
        options["custom_ops_library"] = name
    elif isinstance(old, str) and old and "/" not in old and (directory / old).is_file():
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
                    custom_ops_library: str | None = None, fields: dict[str, Any] | None = None) -> ModelDir:
    """Write a model directory at `directory` atomically: `export(onnx path)` writes `onnx/model.onnx` (and
    whatever goes beside it), then the configs and tokenizer files are added and the whole renamed into place.

    config/generation: transformers' config and generation config as dicts (written as config.json and
    generation_config.json). tokenizer_dir: the base model directory, whose tokenizer files are copied. The
    genai config is written when the graph is a decoder with a cache, from `fields` (`config_fields`; without
    them, `config` as it is). Paths in `export`'s result point into the
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
        copied = tokenizer_files(tokenizer_dir)
        for file in copied:
            shutil.copyfile(file, tmp / file.name)
        if (tmp / "tokenizer_config.json").is_file():
            portable_tokenizer_config(tmp / "tokenizer_config.json")
        # an encoder-decoder export writes onnx/encoder_model.onnx, ... instead (no genai config: a decoder only)
        inputs, outputs, _ = _graph_io(tmp / MODEL_FILE) if (tmp / MODEL_FILE).is_file() else ([], [], {})
        if "past_key_values.0.key" in inputs and "logits" in outputs:
            library = None
            if custom_ops_library is not None:
                library = library_name(custom_ops_library)
                shutil.copyfile(custom_ops_library, tmp / library)
            genai = genai_config(config if fields is None else fields, tmp / MODEL_FILE, generation=generation,
                                 custom_ops_library=library)
            (tmp / GENAI_CONFIG).write_text(json.dumps(genai, indent=4) + "\n")
        files = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())
    return ModelDir(directory, files, result, tmp)
