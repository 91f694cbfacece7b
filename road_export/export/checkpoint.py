"""Merge a peft RoAd adapter into a transformers checkpoint shard by shard, with memory bounded by one tensor.

RoAd's merge rotates rows of a weight and keeps its dtype and shape, so every output shard has exactly the
input shard's safetensors header: untouched tensors are copied byte for byte in chunks, adapted ones are read
one at a time into a buffer of their own (not memory-mapped: touched mapped pages would count towards the
process's memory), merged row-wise in float32 (in place for float32) and written back from that buffer.

Which axis of a weight indexes outputs is read off the layer itself (transformers' `Conv1D`, as in GPT-2 and
OpenAI GPT, keeps [in, out]; nn.Linear [out, in]) on the model's modules built without storage (device "meta"),
and so are tied parameters: a tensor changed on one side of a tie (RoAd on a tied lm_head, modules_to_save of
lm_head or embed_tokens) is written untied, the other side keeps the checkpoint's values, `config.json` gets
`tie_word_embeddings: false`, and the extra tensors go to one more shard listed in the safetensors index.
"""

from __future__ import annotations

import json
import shutil
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from road_export.core import requires_export  # noqa: F401  (one clear line without the export extra)
import torch

from road_export.core import rotation
from road_export.export import zoo
from road_export.graph.adapter_files import read_adapter
from road_export.core.errors import RoadError
from road_export.graph.files import atomic_write, read_json_object
from road_export.export.layers import is_supported_base, output_axis

INDEX_NAME = "model.safetensors.index.json"
UNTIED_SHARD = "model-untied.safetensors"
HEAD_SHARD = "model-head.safetensors"  # a task head the base checkpoint lacks (modules_to_save of a new classifier)
CHUNK = 4 * 2**20
BLOCK_ROWS = 1024  # rows merged at a time (whole groups), so merge_'s scratch copy stays small
DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


@dataclass
class MergeReport:
    out_dir: Path
    shards: int
    merged: list[str] = field(default_factory=list)  # tensors rotated
    replaced: list[str] = field(default_factory=list)  # modules_to_save tensors taken from the adapter
    untied: list[str] = field(default_factory=list)  # tensors written apart from the tensor they were tied to
    added: list[str] = field(default_factory=list)  # head tensors the base checkpoint lacks, from the adapter
    largest_tensor_bytes: int = 0


RESAVE = "save the model again with save_pretrained"


def _index(base: Path) -> dict[str, Any] | None:
    """The safetensors index of the checkpoint at `base` ({"weight_map": {tensor: shard file}, ...}), None where
    it has none. Raises RoadError for an index that is not JSON, or has no such weight_map."""
    path = base / INDEX_NAME
    if not path.is_file():
        return None
    index = read_json_object(path, RESAVE)
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise RoadError(f"{path}: not a safetensors index (its weight_map must map tensor names to shard file "
                        f"names); {RESAVE}")
    return index


def _shards(base: Path, index: dict[str, Any] | None) -> list[Path]:
    if index is not None:
        return [base / name for name in sorted(set(index["weight_map"].values()))]
    single = base / "model.safetensors"
    if single.is_file():
        return [single]
    raise RoadError(f"{base}: no model.safetensors or model.safetensors.index.json; merge-checkpoint needs "
                    "safetensors weights")


def _header(path: Path) -> tuple[int, dict]:
    try:
        with path.open("rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
    except (OSError, struct.error, ValueError) as e:
        raise RoadError(f"{path}: not a readable safetensors file ({e}); {RESAVE}") from e
    if not isinstance(header, dict):
        raise RoadError(f"{path}: not a readable safetensors file (its header is not a JSON object); {RESAVE}")
    for key, info in header.items():
        if key != "__metadata__" and not _entry(info):
            raise RoadError(f"{path}: not a readable safetensors file (its header's entry {key!r} is not "
                            f"{{dtype, shape, data_offsets}}); {RESAVE}")
    return length, header


def _entry(info: Any) -> bool:
    """Whether a safetensors header entry is {dtype, shape: [int], data_offsets: [begin, end]}."""
    def ints(value: Any) -> bool:
        return isinstance(value, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in value)

    return isinstance(info, dict) and isinstance(info.get("dtype"), str) and ints(info.get("shape")) and \
        ints(info.get("data_offsets")) and len(info["data_offsets"]) == 2


def merge_checkpoint(base_dir: str | Path, adapter_dir: str | Path, out_dir: str | Path) -> MergeReport:
    """Write `out_dir`: the checkpoint at `base_dir` with the adapter merged (loads with `from_pretrained`).

    Raises RoadError for a directory without safetensors weights, an adapter for another model, or an output
    directory that exists and is not empty; on any failure nothing is left at `out_dir`.
    """
    base, out = Path(base_dir), Path(out_dir)
    if not (base / "config.json").is_file():
        raise RoadError(f"{base}: not a transformers model directory (no config.json)")
    if out.exists() and any(out.iterdir()):
        raise RoadError(f"{out}: exists and is not empty; choose a new directory")
    if not out.parent.is_dir():
        raise RoadError(f"{out}: directory {out.parent} does not exist")
    adapter = read_adapter(adapter_dir)
    config = read_json_object(base / "config.json", RESAVE)
    meta = zoo.meta_model(zoo.read_config(base))
    g = adapter.config.group_size
    index = _index(base)
    shards = _shards(base, index)
    headers = {shard: _header(shard) for shard in shards}
    where = {key: shard for shard, (_, header) in headers.items() for key in header if key != "__metadata__"}
    tied = {name: group for group in zoo.tied_groups(meta) for name in group}
    extra = {_unwrapped(k, adapter.road): torch.from_numpy(t) for k, t in adapter.extra.items()}
    keys = [*extra, *(f"{m}.{p}" for m in adapter.road for p in ("weight", "bias"))]
    stored_as = {k: k if k in where else next((t for t in tied.get(k, []) if t in where), None) for k in keys}
    unstored = [k for k in extra if stored_as[k] is None]
    head, head_config = _new_head(base, adapter, {k: extra[k] for k in unstored}) if unstored else ({}, {})
    unstored = [k for k in unstored if k not in head]
    if unstored:
        arch = head_config.get("architectures", [None])[0]
        kind = f", nor a tensor of {arch} (its peft task_type's model) of that shape" if arch else ""
        raise RoadError(f"{adapter.path}: modules_to_save tensor {unstored[0]} (shape {tuple(extra[unstored[0]].shape)}"
                        f") is not stored in {base}{kind}; the adapter was made for another model: merge it into "
                        "the base it was trained on")
    for key in head:
        del extra[key], stored_as[key]
    unplaced = [m for m in adapter.road if stored_as[f"{m}.weight"] is None]
    if unplaced:
        shown = ", ".join(unplaced[:5]) + (f" and {len(unplaced) - 5} more" if len(unplaced) > 5 else "")
        raise RoadError(f"{adapter.path}: {len(unplaced)} adapted tensor(s) have no place in {base}: {shown}; "
                        "the adapter was made for another model")
    _check_extra_shapes(adapter.path, extra, stored_as, headers, where, base)
    plan: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    axes: dict[str, int] = {}
    for module, params in adapter.road.items():
        layer = _layer(meta, module)
        axis = output_axis(layer) if layer is not None else 0
        stored = stored_as[f"{module}.weight"]
        shape = headers[where[stored]][1][stored]["shape"]
        width = shape[axis] if len(shape) == 2 else shape[0]
        if width % g:
            raise RoadError(f"{adapter.path}: {module} has {width} outputs, not divisible by group_size {g}")
        expected = rotation.params_length(adapter.config.variant, width)
        if tuple(params["road_theta"].shape) != (expected,):
            raise RoadError(f"{adapter.path}: {module}.road_theta has shape {tuple(params['road_theta'].shape)}, "
                            f"expected ({expected},) for {adapter.config.variant} on {width} outputs")
        coeffs = rotation.coefficients(adapter.config.variant, g, torch.from_numpy(params["road_theta"]).float(),
                                       torch.from_numpy(params["road_alpha"]).float())
        plan[f"{module}.weight"], axes[f"{module}.weight"] = coeffs, axis
        if stored_as[f"{module}.bias"] is not None:
            plan[f"{module}.bias"], axes[f"{module}.bias"] = coeffs, 0
    # A changed tensor stored under its own name changes in place; one stored under a tied name is written apart
    # ("change"), and so is every unchanged name tied to a stored tensor that changes ("keep": the old values).
    changed = set(plan) | set(extra)
    untied: dict[str, tuple[str, str]] = {}
    for key in sorted(changed):
        source = stored_as[key]
        if key != source:
            untied[key] = (source, "change")
        elif key in tied:
            for other in tied[key]:
                if other != key and other not in changed:
                    untied[other] = (source, "keep")
    in_place = {k for k in changed if stored_as[k] == k}
    plan_stored = {k: plan[k] for k in in_place if k in plan}
    extra_stored = {k: extra[k] for k in in_place if k in extra}
    report = MergeReport(out, len(shards))
    # Two buffers serve every tensor: reusing them keeps the allocator from growing a heap of freed blocks.
    largest = max((end - begin for shard, (_, header) in headers.items() for key, info in header.items()
                   if key in in_place for begin, end in [info["data_offsets"]]), default=0)
    _fixed_mmap_threshold()
    buffers = (bytearray(largest), bytearray(CHUNK))
    with atomic_write(out) as tmp:  # an empty `out` is replaced; a failure leaves nothing behind
        tmp.mkdir()
        names = {shard: shard.name for shard in shards}
        if (untied or head) and index is None:  # transformers reads a single file first
            names[shards[0]] = "model-00001-of-00001.safetensors"
        for shard in shards:
            _write_shard(shard, tmp / names[shard], headers[shard], plan_stored, extra_stored, axes, g, report,
                         buffers)
        if untied or head:
            if index is None:
                index = {"metadata": {}, "weight_map": {k: names[shards[0]] for k in where}}
            if untied:
                _write_untied(tmp / UNTIED_SHARD, untied, plan, axes, extra, where, g, report)
                index["weight_map"].update({k: UNTIED_SHARD for k in untied})
                config["tie_word_embeddings"] = False  # what was written: the two sides are separate tensors now
            if head:
                _write_head(tmp / HEAD_SHARD, head, _stored_dtype(headers), report)
                index["weight_map"].update({k: HEAD_SHARD for k in head})
                config.update(head_config)
            (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
            (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        for item in base.iterdir():
            if item.is_file() and item.suffix != ".safetensors" and not (tmp / item.name).exists():
                shutil.copy2(item, tmp / item.name)
    return report


def _new_head(base: Path, adapter, unstored: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict]:
    """The modules_to_save tensors of a head the base checkpoint lacks: those of `unstored` that the model class
    of the adapter's peft `task_type` has, with the same shape once its head is sized as the adapter's (e.g. a
    classifier trained on a masked-LM checkpoint with `...ForSequenceClassification.from_pretrained(base,
    num_labels=3)`); and the config.json keys that model saves for its head (`architectures`, `id2label`,
    `label2id`: what peft's `merge_and_unload()` followed by `save_pretrained` writes). ({}, {}) for an adapter
    without a task_type road-export knows; ({}, {"architectures": [...]}) when none of the tensors fits."""
    from road_export.export.source import resolve_task

    task = resolve_task(None, [adapter])
    if task is None:
        return {}, {}
    config = zoo.read_config(base)
    params = dict(zoo.meta_model(config, task).named_parameters())
    for key, tensor in unstored.items():  # the head's size: the label count its output rows give
        param = params.get(key)
        if param is not None and param.dim() >= 1 and param.shape[0] == config.num_labels \
                and tensor.dim() == param.dim() and tuple(tensor.shape[1:]) == tuple(param.shape[1:]) \
                and tensor.shape[0] != param.shape[0]:
            config.num_labels = int(tensor.shape[0])  # transformers rebuilds id2label / label2id
            break
    meta = zoo.meta_model(config, task)
    params = dict(meta.named_parameters())
    head = {k: t for k, t in unstored.items() if k in params and tuple(params[k].shape) == tuple(t.shape)}
    keys: dict[str, Any] = {"architectures": [type(meta).__name__]}
    saved: Any = meta.config
    if head and hasattr(saved, "id2label"):
        keys["id2label"] = {str(i): label for i, label in saved.id2label.items()}
        keys["label2id"] = dict(saved.label2id)
    return head, keys


def _stored_dtype(headers: dict) -> torch.dtype:
    """The dtype of most of the checkpoint's float tensors (new tensors are written in it)."""
    counts: dict[str, int] = {}
    for _, header in headers.values():
        for key, info in header.items():
            if key != "__metadata__" and info["dtype"] in DTYPES:
                counts[info["dtype"]] = counts.get(info["dtype"], 0) + 1
    return DTYPES[max(counts, key=lambda name: counts[name])] if counts else torch.float32


def _write_head(target: Path, head: dict[str, torch.Tensor], dtype: torch.dtype, report: MergeReport) -> None:
    """The shard of the new head's tensors (the adapter's modules_to_save values, in the checkpoint's dtype)."""
    from safetensors.torch import save_file

    save_file({k: t.to(dtype).contiguous() for k, t in sorted(head.items())}, str(target), metadata={"format": "pt"})
    report.added.extend(sorted(head))


def _check_extra_shapes(adapter_path: Path, extra: dict[str, torch.Tensor], stored_as: dict[str, str | None],
                        headers: dict, where: dict, base: Path) -> None:
    """Every modules_to_save tensor (and every base_layer weight peft saves for a targeted head) has the shape of
    the checkpoint tensor it replaces, checked before anything is written. An adapter saved after
    `resize_token_embeddings` carries embeddings and a head of the resized vocabulary: RoadError (exit 2) naming the
    tensor, both shapes and the fix, instead of a failure in the shard writer with half a directory written."""
    for key, tensor in extra.items():
        stored = stored_as[key]
        shape = tuple(headers[where[stored]][1][stored]["shape"])
        got = tuple(tensor.shape)
        if got == shape:
            continue
        hint = "it was made for another model"
        if len(got) == len(shape) == 2 and got[1:] == shape[1:]:
            hint = (f"the adapter was saved from a model with {got[0]} rows (resize_token_embeddings); resize the base "
                    f"the same way (model.resize_token_embeddings({got[0]})), save it, and merge into that")
        raise RoadError(f"{adapter_path}: tensor {key} has shape {got}, the checkpoint's {stored} in {base} is "
                        f"{shape}; {hint}")


def _layer(meta, module: str):
    """The linear layer at `module` in the storage-less model, or None where it is not one."""
    try:
        layer = meta.get_submodule(module)
    except AttributeError:
        return None
    return layer if is_supported_base(layer) else None


def _unwrapped(key: str, road: dict) -> str:
    """`<m>.base_layer.<p>` (peft saves the base of a targeted lm_head/embed_tokens) is the checkpoint's `<m>.<p>`."""
    module, sep, param = key.partition(".base_layer.")
    return f"{module}.{param}" if sep and module in road else key


def _write_untied(target: Path, untied: dict, plan: dict, axes: dict, extra: dict, where: dict, g: int,
                  report: MergeReport) -> None:
    """The shard of tensors that leave a tie: the changed side's new values, or the kept side's old ones."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    for key, (source, how) in sorted(untied.items()):
        with safe_open(str(where[source]), framework="pt") as f:
            tensor = f.get_tensor(source).clone()
        if how == "change" and key in extra:
            tensor = extra[key].to(tensor.dtype).reshape(tensor.shape).clone()
            report.replaced.append(key)
        if how == "change" and key in plan:
            c1, c2 = plan[key]
            _merge_in_place(tensor, c1, c2, g, axes[key] if tensor.dim() == 2 else 0)
            report.merged.append(key)
        tensors[key] = tensor.contiguous()
        report.untied.append(key)
    save_file(tensors, str(target), metadata={"format": "pt"})


def _merge_in_place(tensor: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor, g: int, axis: int) -> None:
    """Rotate `tensor` (any float dtype) in place, a block of whole groups of rows at a time along axis 0."""
    if axis != 0:  # Conv1D [in, out]: column blocks are not contiguous views, merge whole
        tensor.copy_(rotation.merge_(tensor.float(), c1, c2, g, axis=axis).to(tensor.dtype))
        return
    step = max(g, BLOCK_ROWS // g * g)
    for start in range(0, tensor.shape[0], step):
        block = tensor[start:start + step]
        part1, part2 = c1[start:start + step], c2[start:start + step]
        if block.dtype == torch.float32:
            rotation.merge_(block, part1, part2, g, axis=0)
        else:
            block.copy_(rotation.merge_(block.float(), part1, part2, g, axis=0).to(block.dtype))


def _fixed_mmap_threshold() -> None:
    """Make glibc return freed large blocks to the OS: its adaptive threshold would keep them in the heap."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD = 1 MiB, which also stops adapting
    except (OSError, AttributeError):
        pass


def _write_shard(source: Path, target: Path, header_info, plan, extra, axes, g, report, buffers) -> None:
    length, header = header_info
    tensor_buffer, copy_buffer = memoryview(buffers[0]), memoryview(buffers[1])
    entries = sorted(((k, v) for k, v in header.items() if k != "__metadata__"), key=lambda kv: kv[1]["data_offsets"])
    data_start = 8 + length
    with source.open("rb") as src, target.open("wb") as dst:
        dst.write(src.read(data_start))  # the header is unchanged: same names, dtypes, shapes and offsets
        for key, info in entries:
            begin, end = info["data_offsets"]
            report.largest_tensor_bytes = max(report.largest_tensor_bytes, end - begin)
            src.seek(data_start + begin)
            if key in plan or key in extra:
                dtype = DTYPES.get(info["dtype"])
                if dtype is None:
                    raise RoadError(f"{source}: tensor {key} has dtype {info['dtype']}; only float weights merge")
                buffer = tensor_buffer[: end - begin]
                if src.readinto(buffer) != len(buffer):
                    raise RoadError(f"{source}: truncated at tensor {key}")
                tensor = torch.frombuffer(buffer, dtype=dtype).reshape(info["shape"])
                if key in extra:  # modules_to_save, or the base_layer weight peft saves for a targeted head
                    tensor.copy_(extra[key].to(dtype).reshape(tensor.shape))
                    report.replaced.append(key)
                if key in plan:
                    c1, c2 = plan[key]
                    work_axis = axes[key] if tensor.dim() == 2 else 0
                    _merge_in_place(tensor, c1, c2, g, work_axis)
                    report.merged.append(key)
                dst.write(buffer)
                del tensor, buffer
            else:
                remaining = end - begin
                while remaining:
                    n = src.readinto(copy_buffer[: min(CHUNK, remaining)])
                    if not n:
                        raise RoadError(f"{source}: truncated at tensor {key}")
                    dst.write(copy_buffer[:n])
                    remaining -= n
