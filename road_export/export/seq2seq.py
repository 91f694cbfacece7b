"""Encoder-decoder models (T5, mT5, BART, Marian, ...) exported as optimum lays them out: three ONNX files.

    encoder_model.onnx            input_ids, attention_mask [batch_size, encoder_sequence_length]
                                  -> last_hidden_state [batch_size, encoder_sequence_length, hidden]
    decoder_model.onnx            input_ids [batch_size, decoder_sequence_length], encoder_attention_mask,
                                  encoder_hidden_states -> logits, present.{i}.decoder.key|value
                                  [batch_size, heads, decoder_sequence_length, head_dim] and
                                  present.{i}.encoder.key|value
                                  [batch_size, heads, encoder_sequence_length_out, head_dim]
    decoder_with_past_model.onnx  input_ids, encoder_attention_mask, past_key_values.{i}.decoder|encoder.key|value
                                  -> logits, present.{i}.decoder.key|value (the encoder's keys/values do not change)

Names and axes follow optimum's `OnnxSeq2SeqConfigWithPast` (optimum/exporters/onnx/base.py, `add_past_key_values`)
and `TextSeq2SeqOnnxConfig` (config.py). Beside the pair, `decoder_model_merged.onnx` holds both decoders behind an
If on `use_cache_branch` (`merge_decoders`): transformers.js loads only that one, ORTModelForSeq2SeqLM either.
Each file's road nodes and swap records are those of the layers that run in it. A mixed-adapter export
(`adapter_ids`) gives the input to every file in which an adapted layer runs, and only to those; a swappable
export writes one `.onnx_adapter` per such file (`<file stem>.<adapter>.onnx_adapter`), since onnxruntime refuses
adapter parameters that are not inputs of the session they are applied to.

`text2text-generation` writes the encoder and `decoder_model.onnx` only (no cache: every step reruns the decoder
over all tokens so far); `text2text-generation-with-past` (the default) adds the decoder with past and the merged
decoder.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from road_export import ops as road_op
from road_export.errors import RoadError
from road_export.export import capture, post, prepare
from road_export.export.result import ExportResult, road_nodes, save_and_swap, swappable_layers
from road_export.export.tasks import SEQ2SEQ, TaskSpec
from road_export.files import atomic_write, save_model
from road_export.names import BATCH, METADATA_SEQ2SEQ, SEQ2SEQ_FILES, SEQ2SEQ_MERGED

__all__ = ["PARTS", "Part", "Seq2SeqResult", "export_seq2seq", "is_seq2seq", "part_module", "parts",
           "sample_inputs"]

TASKS = SEQ2SEQ  # ("text2text-generation", "text2text-generation-with-past")
ENCODER, DECODER, DECODER_WITH_PAST = "encoder", "decoder", "decoder_with_past"
PARTS = (ENCODER, DECODER, DECODER_WITH_PAST)
DECODER_MERGED = "decoder_merged"  # Seq2SeqResult.files key of decoder_model_merged.onnx
ENC_SEQ, DEC_SEQ = "encoder_sequence_length", "decoder_sequence_length"
PAST_DEC_SEQ, PRESENT_DEC_SEQ, ENC_SEQ_OUT = ("past_decoder_sequence_length", "past_decoder_sequence_length + 1",
                                            "encoder_sequence_length_out")


def is_seq2seq(model: nn.Module) -> bool:
    """Whether `model` (or a peft model's base) is a transformers encoder-decoder language model."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(inner, "config", None)
    return bool(getattr(config, "is_encoder_decoder", False)) and hasattr(inner, "get_encoder")


@dataclass(frozen=True)
class Part:
    """One file of the model: its inputs and outputs (optimum's names and order) and every axis name."""

    name: str  # encoder | decoder | decoder_with_past
    file: str
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    axes: dict[str, dict[int, str]]
    layers: int = 0  # decoder layers (cache entries)


def _cache_names(prefix: str, layers: int, kinds: tuple[str, ...]) -> list[str]:
    return [f"{prefix}.{i}.{kind}.{kv}" for i in range(layers) for kind in kinds for kv in ("key", "value")]


def cache_layout(model: nn.Module) -> tuple[int, list[tuple[int, int]], list[tuple[int, int]]]:
    """(decoder layers, [(heads, head_dim)] of the self-attention cache, of the cross-attention cache), read off
    one forward pass with a cache, so the sizes are the model's own."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    ids = torch.ones(1, 2, dtype=torch.int64)
    with torch.no_grad():
        out = inner(input_ids=ids, attention_mask=torch.ones_like(ids), decoder_input_ids=ids[:, :1],
                    use_cache=True, return_dict=True)
    cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
    selfc = getattr(cache, "self_attention_cache", None)
    cross = getattr(cache, "cross_attention_cache", None)
    if selfc is None or cross is None:
        raise RoadError(f"{type(inner).__name__} returned no encoder-decoder cache; export it with --task "
                        "text2text-generation")
    dims = [[(int(layer.keys.shape[1]), int(layer.keys.shape[3])) for layer in c.layers] for c in (selfc, cross)]
    return len(selfc.layers), dims[0], dims[1]


def parts(model: nn.Module, task: str = "text2text-generation-with-past", mixed: bool = False) -> list[Part]:
    """The files of `task` for `model`, with optimum's I/O names; `mixed` adds `adapter_ids` to each (the exporter
    keeps it only where an adapted layer runs)."""
    if task not in TASKS:
        raise RoadError(f"unknown encoder-decoder task {task!r}; choose one of {', '.join(TASKS)}")
    layers, _, _ = cache_layout(model)
    ids = ["adapter_ids"] if mixed else []
    batch = {"adapter_ids": {0: BATCH}}
    encoder = Part(ENCODER, SEQ2SEQ_FILES[0], ("input_ids", "attention_mask", *ids), ("last_hidden_state",),
                   {"input_ids": {0: BATCH, 1: ENC_SEQ}, "attention_mask": {0: BATCH, 1: ENC_SEQ},
                    "last_hidden_state": {0: BATCH, 1: ENC_SEQ}, **batch})
    present = _cache_names("present", layers, ("decoder", "encoder"))
    dec_axes = {"input_ids": {0: BATCH, 1: DEC_SEQ}, "encoder_attention_mask": {0: BATCH, 1: ENC_SEQ},
                "encoder_hidden_states": {0: BATCH, 1: ENC_SEQ}, "logits": {0: BATCH, 1: DEC_SEQ}, **batch}
    for name in present:
        dec_axes[name] = {0: BATCH, 2: ENC_SEQ_OUT if ".encoder." in name else DEC_SEQ}
    decoder = Part(DECODER, SEQ2SEQ_FILES[1], ("input_ids", "encoder_attention_mask", "encoder_hidden_states", *ids),
                   ("logits", *present), dec_axes, layers)
    if task == "text2text-generation":
        return [encoder, decoder]
    past = _cache_names("past_key_values", layers, ("decoder", "encoder"))
    present_dec = _cache_names("present", layers, ("decoder",))
    past_axes = {"input_ids": {0: BATCH, 1: DEC_SEQ}, "encoder_attention_mask": {0: BATCH, 1: ENC_SEQ},
                 "logits": {0: BATCH, 1: DEC_SEQ}, **batch}
    for name in past:
        past_axes[name] = {0: BATCH, 2: ENC_SEQ_OUT if ".encoder." in name else PAST_DEC_SEQ}
    for name in present_dec:
        past_axes[name] = {0: BATCH, 2: PRESENT_DEC_SEQ}
    with_past = Part(DECODER_WITH_PAST, SEQ2SEQ_FILES[2], ("input_ids", "encoder_attention_mask", *past, *ids),
                     ("logits", *present_dec), past_axes, layers)
    return [encoder, decoder, with_past]


def sample_inputs(model: nn.Module, part: Part, *, batch: int = 2, encoder_length: int = 7, decoder_length: int = 3,
                  past: int = 4, pad: int = 0, seed: int = 0, adapters: int = 0) -> dict[str, torch.Tensor]:
    """Inputs for `part`: token ids within the vocabulary, an encoder mask with `pad` left-padded positions in row 0,
    random encoder states and cached keys/values (`past` decoder positions), `adapter_ids` cycling 0..adapters."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    gen = torch.Generator().manual_seed(seed)
    vocab = int(inner.config.vocab_size)
    mask = torch.ones(batch, encoder_length, dtype=torch.int64)
    if pad:
        mask[0, :pad] = 0
    if part.name == ENCODER:
        out = {"input_ids": torch.randint(min(3, vocab - 1), vocab, (batch, encoder_length), generator=gen),
               "attention_mask": mask}
    else:
        out = {"input_ids": torch.randint(min(3, vocab - 1), vocab, (batch, decoder_length), generator=gen),
               "encoder_attention_mask": mask}
    if "encoder_hidden_states" in part.input_names:
        hidden = int(getattr(inner.config, "d_model", 0) or inner.config.hidden_size)
        out["encoder_hidden_states"] = torch.randn(batch, encoder_length, hidden, generator=gen)
    if part.name == DECODER_WITH_PAST:
        _, self_dims, cross_dims = cache_layout(model)
        for i in range(part.layers):
            for kind, (heads, dim), length in (("decoder", self_dims[i], past), ("encoder", cross_dims[i],
                                                                                  encoder_length)):
                for kv in ("key", "value"):
                    out[f"past_key_values.{i}.{kind}.{kv}"] = torch.randn(batch, heads, length, dim, generator=gen)
    if "adapter_ids" in part.input_names:
        out["adapter_ids"] = (torch.arange(batch, dtype=torch.int64) + 1) % (adapters + 1)
    return {name: out[name] for name in part.input_names}


class PartModule(nn.Module):
    """Runs one part of a transformers encoder-decoder model (or a peft model of one) with the part's named inputs
    and returns its outputs in order. The wrapped model is registered as `model`, so initializers are
    `model.<path>`, as with `tasks.TaskModule`.

    A peft model is the reference (verify): its encoder output is read from the whole model's forward
    (`encoder_last_hidden_state`), so peft's own per-row `adapter_names` routing applies to the encoder too.
    """

    def __init__(self, model: nn.Module, part: Part, order: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.model = model
        self.part = part
        self.order = order
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model
        from road_export.export.tasks import cache_keyword

        self.cache_keyword = cache_keyword(inner)

    def forward(self, *args):
        inputs = dict(zip(self.part.input_names, args, strict=True))
        ids = inputs.pop("adapter_ids", None)
        if ids is not None and hasattr(self.model, "peft_config"):
            inputs["adapter_names"] = [self.order[i - 1] if i else "__base__" for i in ids.tolist()]
        elif ids is not None:
            from road_export.model import adapter_ids as rows

            with rows(self.model, ids, self.order):
                return self._call(inputs)
        return self._call(inputs)

    def _call(self, inputs: dict):
        from transformers.modeling_outputs import BaseModelOutput

        extra = {"adapter_names": inputs.pop("adapter_names")} if "adapter_names" in inputs else {}
        if self.part.name == ENCODER:
            if hasattr(self.model, "peft_config"):
                first = inputs["input_ids"][:, :1]
                out = self.model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                                 decoder_input_ids=first, use_cache=False, return_dict=True, **extra)
                return out.encoder_last_hidden_state
            return self.model.get_encoder()(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                                            return_dict=True).last_hidden_state
        from transformers import DynamicCache, EncoderDecoderCache

        layers = self.part.layers
        mask = inputs["encoder_attention_mask"]
        if self.part.name == DECODER:
            states = inputs["encoder_hidden_states"]
            cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
        else:
            dec = [(inputs[f"past_key_values.{i}.decoder.key"], inputs[f"past_key_values.{i}.decoder.value"])
                   for i in range(layers)]
            enc = [(inputs[f"past_key_values.{i}.encoder.key"], inputs[f"past_key_values.{i}.encoder.value"])
                   for i in range(layers)]
            cache = EncoderDecoderCache(DynamicCache(ddp_cache_data=dec), DynamicCache(ddp_cache_data=enc))
            cache.is_updated = {i: True for i in range(layers)}  # the cross-attention keys/values are given
            inner = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
            hidden = int(getattr(inner.config, "d_model", 0) or inner.config.hidden_size)
            # never read (the cross-attention takes the cached keys/values); its shape sizes the encoder mask
            states = enc[0][0].new_zeros(mask.shape[0], mask.shape[1], hidden)
        out = self.model(attention_mask=mask, decoder_input_ids=inputs["input_ids"],
                         encoder_outputs=BaseModelOutput(last_hidden_state=states), use_cache=True, return_dict=True,
                         **{self.cache_keyword: cache}, **extra)
        present = getattr(out, "cache", None) or out.past_key_values
        flat = []
        for i in range(layers):
            self_layer = present.self_attention_cache.layers[i]
            flat += [self_layer.keys, self_layer.values]
            if self.part.name == DECODER:
                cross = present.cross_attention_cache.layers[i]
                flat += [cross.keys, cross.values]
        return (out.logits, *flat)


def part_module(model: nn.Module, part: Part, order: tuple[str, ...] = ()) -> PartModule:
    """The module that runs `part` of `model` (eval mode); for tracing, and as the reference in verify."""
    return PartModule(model, part, order).eval()


def _layers_run(module: PartModule, args: tuple) -> set[str]:
    """Paths of the RoadLayers that run in one eager call of `module` (forward hooks; nothing else changes)."""
    from road_export.model import road_layers

    ran: set[str] = set()
    hooks = [layer.register_forward_hook(lambda m, _i, _o, path=path: ran.add(path))
             for path, layer in road_layers(module.model).items()]
    try:
        with torch.no_grad():
            module(*args)
    finally:
        for hook in hooks:
            hook.remove()
    return ran


@dataclass
class Seq2SeqResult:
    """What `export_seq2seq` wrote: the directory, each file's `ExportResult`, and totals over the files."""

    path: Path
    mode: str
    task: str
    files: dict[str, ExportResult] = field(default_factory=dict)  # part name -> that file's result
    adapters: list[dict] = field(default_factory=list)

    @property
    def road_nodes(self) -> int:
        """road nodes over the encoder and the two decoder files (the merged decoder holds the latter's again)."""
        return sum(r.road_nodes for name, r in self.files.items() if name != DECODER_MERGED)

    @property
    def adapter_files(self) -> list[Path]:
        return [f for r in self.files.values() for f in r.adapter_files]


def export_seq2seq(model: nn.Module, directory: str | os.PathLike, *, mode: str = "merge",
                   task: str | None = None, opset: int | None = None, dtype: torch.dtype | str | None = None,
                   external_data: bool | None = None, optimize: bool = True, require_adapter: bool = True,
                   target: str = "onnxruntime", swappable: bool = True,
                   on_step: Callable[[str], None] | None = None) -> Seq2SeqResult:
    """Export an encoder-decoder model with RoAd adapters as optimum's files into `directory`, a new or empty one.

    The parameters are `road_export.export`'s. In rotate mode each file holds one `road` node per adapted layer that
    runs in it (decoder self- and cross-attention queries in both decoder files, cross-attention keys/values only in
    `decoder_model.onnx`, which computes them from the encoder states). Each file is written atomically and loaded
    by onnxruntime first, and the directory appears whole or not at all (files.atomic_write). Raises RoadError as
    `export` does, and for a model that is not an encoder-decoder or a directory that is not empty.
    """
    step = on_step or (lambda _name: None)
    task = task or TASKS[1]
    if task not in TASKS:
        raise RoadError(f"task {task} does not fit an encoder-decoder model; choose one of {', '.join(TASKS)}")
    if mode not in prepare.MODES:
        raise RoadError(f"unknown mode {mode!r}; choose merge or rotate")
    if not is_seq2seq(model):
        raise RoadError(f"{type(model).__name__} is not an encoder-decoder model; task {task} needs one")
    capture.check_opset(opset)
    dtype = prepare.parse_dtype(dtype)
    directory = Path(directory)
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise RoadError(f"{directory}: exists and is not an empty directory; an encoder-decoder model is written as "
                        "a new directory of ONNX files")
    generation = _generation_ids(model)
    result = Seq2SeqResult(directory, mode, task)
    with atomic_write(directory) as staged:
        staged.mkdir()
        with prepare.adopted(model) as adapted:
            adapters, order = prepare.plan_adapters(adapted, mode, require_adapter=require_adapter,
                                                    name=type(model).__name__)
            result.adapters = adapters
            with prepare.prepared(adapted, mode, dtype, order) as prepared:
                for part in parts(prepared, task, mixed=bool(order)):
                    result.files[part.name] = _export_part(prepared, part, staged, mode, task, adapters, order,
                                                           dtype, opset, optimize, target, external_data,
                                                           swappable, generation, step)
        if DECODER_WITH_PAST in result.files:  # optimum's merged decoder too: what transformers.js loads
            step(f"writing {SEQ2SEQ_MERGED}")
            result.files[DECODER_MERGED] = write_merged_decoder(staged, external_data)
    for res in result.files.values():  # the staged paths -> the final ones
        res.path = directory / res.path.name
        res.external_data = directory / res.external_data.name if res.external_data else None
        res.adapter_files = [directory / f.name for f in res.adapter_files]
    return result


def _export_part(prepared: nn.Module, part: Part, directory: Path, mode: str, task: str, adapters: list[dict],
                 order: tuple[str, ...], dtype, opset, optimize: bool, target: str, external_data, swappable: bool,
                 generation: dict, step):
    """Trace, post-process and save one part; the adapter records and `adapter_ids` only where its layers run."""
    module = part_module(prepared, part, order)
    args = tuple(_cast(t, dtype) for t in sample_inputs(
        prepared, part, batch=3, encoder_length=7, decoder_length=3 if part.name == DECODER else 2,
        past=5, adapters=len(order)).values())
    ran = _layers_run(module, args) if adapters else set()
    if order and not ran:  # no adapted layer runs here: no adapter_ids
        part = _without_ids(part)
        module = part_module(prepared, part, order)
        args = args[:-1]
    step(f"tracing {part.file}")
    dynamic = (tuple(part.axes[name] for name in part.input_names),)  # forward(*args)
    with _frozen(prepared):
        ir_model = capture.torch_export(module, args, list(part.input_names), dynamic, opset, what=part.file)
    records = [{**a, "layers": [p for p in a["layers"] if p in ran]} for a in adapters]
    records = [r for r in records if r["layers"]] if mode == "rotate" else adapters
    return _finish(ir_model, directory / part.file, part, mode, task, records, order,
                   swappable and mode == "rotate" and not order and bool(ran), opset, optimize, target,
                   external_data, generation, step)


@contextlib.contextmanager
def _frozen(model: nn.Module) -> Iterator[None]:
    """Parameters without requires_grad for the trace, as peft leaves a base model: with gradients on, the exporter's
    decomposition turns T5 attention's `reshape` of a transposed output into a `view` it then cannot take
    ("Cannot view a tensor with shape [b, s, heads, d] ... as [b, s, heads * d]"). Restored on exit."""
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def merge_decoders(decoder, with_past):
    """optimum's merged decoder (`decoder_model_merged.onnx`, optimum/onnx/graph_transformations.py `merge_decoders`)
    from the two decoder files as onnx ModelProtos: one `If` on the input `use_cache_branch` (bool [1]) whose else
    branch is decoder_model.onnx and whose then branch is decoder_with_past_model.onnx, its missing outputs
    (`present.{i}.encoder.*`) passed through from the past inputs. Inputs are the union of both files' plus
    `use_cache_branch`; initializers of equal name and content are shared, equal content under another name is
    reused, clashing names get the branch prefix. Each branch's values are prefixed (`np/`, `wp/`). The road
    functions, opsets and metadata (swap records: the first decoder's layers, a superset of the other's) are
    decoder_model.onnx's. Torch-free."""
    import hashlib

    import onnx
    from onnx import helper, numpy_helper

    inits: dict[str, onnx.TensorProto] = {}
    by_content: dict[tuple, str] = {}

    def content(t):
        return t.data_type, tuple(t.dims), hashlib.sha256(numpy_helper.to_array(t).tobytes()).hexdigest()

    def branch(model, prefix: str, passed: list[tuple[str, str, onnx.ValueInfoProto]], order: list[str]):
        graph = model.graph
        outer = {i.name for i in graph.input}
        rename = {}
        for t in graph.initializer:
            key = content(t)
            if t.name in inits and content(inits[t.name]) == key:
                rename[t.name] = t.name
            elif key in by_content and t.name not in outer:
                rename[t.name] = by_content[key]
            else:
                name = t.name if t.name not in inits else prefix + t.name
                copy_ = onnx.TensorProto()
                copy_.CopyFrom(t)
                copy_.name = name
                inits[name] = copy_
                by_content.setdefault(key, name)
                rename[t.name] = name
        nodes = []
        for node in graph.node:
            new = onnx.NodeProto()
            new.CopyFrom(node)
            new.input[:] = [rename.get(x, x if x in outer or not x else prefix + x) for x in node.input]
            new.output[:] = [prefix + x if x else x for x in node.output]
            new.name = prefix + node.name if node.name else ""
            nodes.append(new)
        outputs = {}
        for value in graph.output:
            outputs[value.name] = onnx.ValueInfoProto()
            outputs[value.name].CopyFrom(value)
            outputs[value.name].name = prefix + value.name
        for name, source, info in passed:
            nodes.append(helper.make_node("Identity", [source], [prefix + name]))
            outputs[name] = onnx.ValueInfoProto()
            outputs[name].CopyFrom(info)
            outputs[name].name = prefix + name
        return helper.make_graph(nodes, prefix.strip("/") + "_branch", [], [outputs[n] for n in order])

    order = [o.name for o in decoder.graph.output]
    past_inputs = {i.name: i for i in with_past.graph.input}
    passed = [(n, "past_key_values." + n[len("present."):], past_inputs["past_key_values." + n[len("present."):]])
              for n in order if n.startswith("present.") and ".encoder." in n]
    then_branch = branch(with_past, "wp/", passed, order)
    else_branch = branch(decoder, "np/", [], order)
    inputs, seen = [], set()
    for value in [*decoder.graph.input, *with_past.graph.input]:
        if value.name not in seen:
            seen.add(value.name)
            inputs.append(value)
    inputs.append(helper.make_tensor_value_info("use_cache_branch", onnx.TensorProto.BOOL, [1]))
    node = helper.make_node("If", ["use_cache_branch"], order, name="optimum::if", then_branch=then_branch,
                            else_branch=else_branch)
    graph = helper.make_graph([node], "decoder_model_merged", inputs, list(decoder.graph.output), list(inits.values()))
    model = helper.make_model(graph, opset_imports=list(decoder.opset_import), ir_version=decoder.ir_version)
    functions = {(f.domain, f.name): f for f in [*decoder.functions, *with_past.functions]}
    model.functions.extend(functions.values())
    for prop in decoder.metadata_props:
        model.metadata_props.add(key=prop.key, value=prop.value)
    return model


def write_merged_decoder(directory: Path, external_data: bool | None) -> ExportResult:
    """`merge_decoders` on the two decoder files in `directory`, saved (atomically, loaded by onnxruntime first) as
    `decoder_model_merged.onnx`, with a copy of decoder_model.onnx's `.onnx_adapter` files (the same parameters)."""
    import shutil

    import onnx
    import onnx_ir as ir

    decoder = onnx.load(str(directory / SEQ2SEQ_FILES[1]))
    with_past = onnx.load(str(directory / SEQ2SEQ_FILES[2]))
    merged = ir.serde.deserialize_model(merge_decoders(decoder, with_past))
    path = directory / SEQ2SEQ_MERGED
    data = save_model(merged, path, external_data, check=post.check_loadable)
    files = []
    stem = Path(SEQ2SEQ_FILES[1]).stem
    for source in sorted(directory.glob(f"{stem}.*.onnx_adapter")):
        target = directory / f"{Path(SEQ2SEQ_MERGED).stem}.{source.name[len(stem) + 1:]}"
        shutil.copyfile(source, target)
        files.append(target)
    meta = {p.key: p.value for p in decoder.metadata_props}
    road_nodes = sum(1 for g in (decoder, with_past) for n in g.graph.node if n.domain == road_op.DOMAIN)
    return ExportResult(path, meta.get("road_export.mode", ""), meta.get("road_export.task"),
                        [i.name for i in merged.graph.inputs], [o.name for o in merged.graph.outputs], road_nodes,
                        json.loads(meta.get("road_export.adapters", "[]")), data, files)


def _cast(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return t.to(dtype) if dtype is not None and t.is_floating_point() else t


def _without_ids(part: Part) -> Part:
    axes = {k: v for k, v in part.axes.items() if k != "adapter_ids"}
    return Part(part.name, part.file, tuple(n for n in part.input_names if n != "adapter_ids"), part.output_names,
                axes, part.layers)


def _generation_ids(model: nn.Module) -> dict:
    """decoder_start_token_id, eos_token_id, pad_token_id: the generation config's, else the model config's."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    out = {}
    for key in ("decoder_start_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(getattr(inner, "generation_config", None), key, None)
        if value is None:
            value = getattr(inner.config, key, None)
        if value is not None:
            out[key] = value
    return out


def _finish(ir_model, path: Path, part: Part, mode: str, task: str, records: list[dict], order, swappable: bool,
            opset, optimize: bool, target: str, external_data, generation: dict, step) -> ExportResult:
    """The post-export passes, optimum's axis names, the save and the swap file of one part."""
    import onnx_ir as ir

    layer_of = swappable_layers(records[0]) if swappable else None
    spec = TaskSpec(task, part.input_names, part.output_names, tuple(order))
    plan = post.PostExportPlan(mode, spec, records, opset=opset, swappable_layers=layer_of, optimize=optimize,
                               target=target)
    post.post_export_passes(plan, on_step=step)(ir_model)
    outputs = ir_model.graph.outputs
    for value, name in zip(outputs, part.output_names, strict=True):
        value.name = name
    for value in [*ir_model.graph.inputs, *outputs]:
        axes = part.axes.get(value.name)
        if axes and value.shape is not None:
            dims = list(value.shape)
            for axis, name in axes.items():
                if axis < len(dims) and not isinstance(dims[axis], int):
                    dims[axis] = ir.SymbolicDim(name)
            value.shape = ir.Shape(dims)
    ir_model.metadata_props[METADATA_SEQ2SEQ] = json.dumps({"part": part.name, **generation})
    nodes = road_nodes(ir_model)
    step(f"writing {path.name}")
    data, files = save_and_swap(ir_model, path, external_data, records[0]["name"] if swappable else None)
    return ExportResult(path, mode, task, list(part.input_names), [v.name for v in outputs], nodes, records,
                        data, files)
