"""I/O names and metadata records shared by the exporter and the runtime, torch-free.

Graph I/O follows optimum and transformers.js, axis names included (optimum's `TextDecoderOnnxConfig` and
`OnnxConfigWithPast.add_past_key_values`, optimum/exporters/onnx/config.py and base.py): `input_ids`
[batch_size, sequence_length] int64, `attention_mask` [batch_size, past_sequence_length + sequence_length] int64
(with a cache; [batch_size, sequence_length] without), `position_ids` [batch_size, sequence_length] int64,
`past_key_values.{i}.key|value` [batch_size, kv_heads, past_sequence_length, head_dim] and `present.{i}.key|value`
[batch_size, kv_heads, past_sequence_length + sequence_length, head_dim] float, `logits` [batch_size,
sequence_length, vocab]; a mixed-adapter export adds `adapter_ids` [batch_size] int64 (0: no adapter, peft's
`"__base__"`, k: the k-th adapter). Metadata props are written under the
`road_export.` prefix; `road_export.adapters` is a JSON list of {name, variant, group_size, layers[, id]}.
"""

from __future__ import annotations

import re

import numpy as np

from road_export.core.errors import RoadError

__all__ = [
    "ADAPTER_IDS",
    "BASE_NAME",
    "BATCH",
    "GRAPH_BUILDER",
    "METADATA_ADAPTERS",
    "METADATA_GRAPH",
    "METADATA_MODE",
    "METADATA_PREFIX",
    "METADATA_QUANTIZE",
    "METADATA_ROPE",
    "METADATA_SEQ2SEQ",
    "METADATA_SWAP",
    "METADATA_TASK",
    "METADATA_VERSION",
    "PAST",
    "PAST_SEQUENCE",
    "PRESENT",
    "SEQ2SEQ_FILES",
    "SEQ2SEQ_MERGED",
    "SEQUENCE",
    "TOTAL_SEQUENCE",
    "check_adapter_name",
    "read_record",
    "recorded_adapter_names",
    "positions",
]

BASE_NAME = "__base__"  # peft's name for "no adapter" in a mixed batch (peft tuners_utils, `adapter_names`)
ADAPTER_IDS = "adapter_ids"
PAST, PRESENT = "past_key_values.", "present."
# optimum's axis names; transformers.js and onnxruntime-genai size the first (empty) cache from the past axis
BATCH, SEQUENCE, PAST_SEQUENCE = "batch_size", "sequence_length", "past_sequence_length"
TOTAL_SEQUENCE = "past_sequence_length + sequence_length"
# an encoder-decoder model's files, optimum's names (optimum/onnxruntime/utils.py ONNX_ENCODER_NAME, ...)
SEQ2SEQ_FILES = ("encoder_model.onnx", "decoder_model.onnx", "decoder_with_past_model.onnx")
SEQ2SEQ_MERGED = "decoder_model_merged.onnx"  # both decoders behind an If on `use_cache_branch` (transformers.js)

METADATA_PREFIX = "road_export."
METADATA_VERSION = METADATA_PREFIX + "version"
METADATA_MODE = METADATA_PREFIX + "mode"  # "merge" or "rotate"
METADATA_TASK = METADATA_PREFIX + "task"
METADATA_ADAPTERS = METADATA_PREFIX + "adapters"  # JSON list of {name, variant, group_size, layers[, id]}
METADATA_SEQ2SEQ = METADATA_PREFIX + "seq2seq"  # JSON {part, decoder_start_token_id, eos_token_id, pad_token_id}
METADATA_SWAP = METADATA_PREFIX + "swap"  # JSON {layer: {c1, c2, group_size, width, dtype}} (road_export.graph.swap)
METADATA_QUANTIZE = METADATA_PREFIX + "quantize"  # JSON {scheme, bits, block_size, ...} (road_export.graph.quantize)
# JSON {rope_type, original_max_position_embeddings, recompute_cache_at, max_position_embeddings} of a rope that
# changes with the sequence length (road_export.export.rope); generation re-runs the whole sequence, with an empty
# cache, when it first reaches `recompute_cache_at` tokens, as transformers' generation of that model does
METADATA_ROPE = METADATA_PREFIX + "rope"
# "genai-builder": the graph was written by onnxruntime-genai's model builder and RoAd attached to it
# (road_export.passes.builder_graph); its swap records add "parts": [[peft module, offset, width], ...] per packed layer
METADATA_GRAPH = METADATA_PREFIX + "graph"
GRAPH_BUILDER = "genai-builder"

_RECORD_KIND = {METADATA_ADAPTERS: list, METADATA_SWAP: dict, METADATA_SEQ2SEQ: dict, METADATA_ROPE: dict,
                METADATA_QUANTIZE: dict}


def read_record(metadata: dict[str, str], key: str, where: str, default=None):
    """The JSON record `metadata[key]` of a file road-export wrote, checked for the shape road-export writes, or
    `default` when the file has none: `road_export.adapters` a list of {name, variant, group_size, layers[, id]},
    `road_export.swap` {layer: {c1, c2, group_size, ...}}, `road_export.seq2seq` / `.rope` / `.quantize` objects.

    Raises RoadError "WHERE: its KEY metadata is not road-export's record (WHY); re-export the file" for text that
    is not JSON or JSON of another shape (a file edited by hand, or written by another tool under our prefix)."""
    text = metadata.get(key)
    if text is None or text == "":
        return default
    fix = "; re-export the file with road-export (or remove that metadata entry)"
    try:
        import json

        value = json.loads(text)
    except ValueError as e:
        raise RoadError(f"{where}: its {key} metadata is not JSON ({e}){fix}") from e
    kind = _RECORD_KIND.get(key)
    if kind is not None and not isinstance(value, kind):
        raise RoadError(f"{where}: its {key} metadata is a JSON {type(value).__name__}, road-export writes a "
                        f"{kind.__name__} there{fix}")
    if key == METADATA_ADAPTERS:
        for item in value:
            if not isinstance(item, dict) or not isinstance(item.get("name"), str) or \
                    not isinstance(item.get("group_size"), int) or not isinstance(item.get("layers"), list) or \
                    not isinstance(item.get("variant"), str) or \
                    ("id" in item and (isinstance(item["id"], bool) or not isinstance(item["id"], int))):
                raise RoadError(f"{where}: its {key} metadata holds {str(item)[:80]!r}, not an adapter record "
                                f"{{name, variant, group_size, layers[, id]}}{fix}")
    if key == METADATA_SWAP:
        for layer, record in value.items():
            if not isinstance(record, dict) or not isinstance(record.get("c1"), str) or \
                    not isinstance(record.get("c2"), str):
                raise RoadError(f"{where}: its {key} metadata holds {layer!r}: {str(record)[:80]!r}, not a swap "
                                f"record {{c1, c2, group_size, ...}}{fix}")
    return value


def recorded_adapter_names(metadata: dict[str, str], where: str) -> list[str]:
    """The adapter names a file's `road_export.adapters` record holds, in `adapter_ids` order (by each record's `id`;
    one adapter has none), [] without the record. Raises RoadError as `read_record` does."""
    records = read_record(metadata, METADATA_ADAPTERS, where, [])
    return [a["name"] for a in sorted(records, key=lambda a: a.get("id", 0))]


# An adapter name becomes a torch ModuleDict key (no '.'), part of initializer names and of MODEL.NAME.onnx_adapter
ADAPTER_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


def check_adapter_name(name: str, where: str = "adapter name") -> str:
    """Refuse a name peft or ONNX cannot carry: empty, with characters outside A-Z a-z 0-9 _ - (a '.' breaks
    torch's ModuleDict and peft's key matching), longer than 64, or the reserved `"__base__"`. Returns `name`;
    raises RoadError (one line naming `where`)."""
    if name == BASE_NAME:
        raise RoadError(f"{where} {name!r}: is reserved for rows without adapter (peft's name); pick another name")
    if not ADAPTER_NAME.fullmatch(name or ""):
        raise RoadError(f"{where} {name!r}: use 1 to 64 letters, digits, '_' or '-' (no '.', spaces or '/'); "
                        "give one with NAME=PATH")
    return name


def positions(attention_mask: np.ndarray) -> np.ndarray:
    """transformers' position ids for a left-padded mask: the count of real tokens before, 1 on padding.

    attention_mask: [batch, sequence] of 0/1 (any integer dtype) -> [batch, sequence] int64. Follows
    transformers' `GenerationMixin.prepare_inputs_for_generation` (`cumsum(-1) - 1`, `masked_fill_(mask == 0, 1)`).
    """
    pos = np.cumsum(attention_mask, -1) - 1
    return np.where(attention_mask == 0, 1, pos).astype(np.int64)
