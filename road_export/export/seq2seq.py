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
If on `use_cache_branch` (the onnx-ir pass passes/merge_decoders.py): transformers.js loads only that one,
ORTModelForSeq2SeqLM either. The three files are three parts of the one export pipeline (pipeline.py): each is traced,
post-processed and saved as a decoder-only model's single file is; this module says what each part is.
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
import functools
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from road_export.core.errors import RoadError
from road_export.export import capture, pipeline, post, prepare
from road_export.export.result import ExportResult, road_nodes
from road_export.export.tasks import SEQ2SEQ, TaskSpec
from road_export.graph.files import atomic_write, save_model
from road_export.core.names import BATCH, METADATA_SEQ2SEQ, SEQ2SEQ_FILES, SEQ2SEQ_MERGED

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
            from road_export.export.model import adapter_ids as rows

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
    from road_export.export.model import road_layers

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
    options = {"opset": opset, "optimize": optimize, "target": target, "external_data": external_data,
               "on_step": on_step}
    with atomic_write(directory) as staged:
        staged.mkdir()
        with prepare.adopted(model) as adapted:
            adapters, order = prepare.plan_adapters(adapted, mode, require_adapter=require_adapter,
                                                    name=type(model).__name__)
            result.adapters = adapters
            context = prepare.ExportContext(mode, dtype, order)
            with context.prepared(adapted) as prepared:
                names: list[str] = []

                def specs() -> Iterator[pipeline.Part]:  # one at a time: each part's run and trace in turn
                    for part in parts(prepared, task, mixed=bool(order)):
                        names.append(part.name)
                        yield part_spec(prepared, part, staged, task, context, adapters, swappable, generation)

                written = pipeline.export_parts(specs(), context, **options)
                result.files.update(zip(names, written, strict=True))
        if DECODER_WITH_PAST in result.files:  # optimum's merged decoder too: what transformers.js loads
            step(f"writing {SEQ2SEQ_MERGED}")
            result.files[DECODER_MERGED] = write_merged_decoder(staged, external_data)
    for res in result.files.values():  # the staged paths -> the final ones
        res.path = directory / res.path.name
        res.external_data = directory / res.external_data.name if res.external_data else None
        res.adapter_files = [directory / f.name for f in res.adapter_files]
    return result


def part_spec(prepared: nn.Module, part: Part, directory: Path, task: str, context: prepare.ExportContext,
              adapters: list[dict], swappable: bool, generation: dict) -> pipeline.Part:
    """One file of the encoder-decoder as a pipeline part: the part's module and sample inputs; the adapter
    records, `adapter_ids` and the swap file only where its layers run (found by running it once); optimum's axis
    names and the `road_export.seq2seq` record ({"part", decoder_start_token_id, eos_token_id, pad_token_id})."""
    order = context.order
    module = part_module(prepared, part, order)
    args = tuple(_cast(t, context.dtype) for t in sample_inputs(
        prepared, part, batch=3, encoder_length=7, decoder_length=3 if part.name == DECODER else 2,
        past=5, adapters=len(order)).values())
    ran = _layers_run(module, args) if adapters else set()
    if order and not ran:  # no adapted layer runs here: no adapter_ids
        part = _without_ids(part)
        module = part_module(prepared, part, order)
        args = args[:-1]
    records = [{**a, "layers": [p for p in a["layers"] if p in ran]} for a in adapters]
    records = [r for r in records if r["layers"]] if context.mode == "rotate" else adapters
    swap = swappable and context.mode == "rotate" and not order and bool(ran)
    return pipeline.Part(directory / part.file, module, args, list(part.input_names),
                         (tuple(part.axes[name] for name in part.input_names),),  # forward(*args)
                         TaskSpec(task, part.input_names, part.output_names, tuple(order)), records,
                         swap_adapter=records[0]["name"] if swap else None, axes=part.axes,
                         metadata={METADATA_SEQ2SEQ: json.dumps({"part": part.name, **generation})},
                         what=part.file, label=part.file, trace_context=functools.partial(_frozen, prepared))


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


def write_merged_decoder(directory: Path, external_data: bool | None) -> ExportResult:
    """optimum's merged decoder (passes/merge_decoders.py: the two decoder files behind one If on
    `use_cache_branch`) from the two decoder files in `directory`, saved (atomically, loaded by onnxruntime first) as
    `decoder_model_merged.onnx`, with a copy of decoder_model.onnx's `.onnx_adapter` files (the same parameters)."""
    import shutil

    import onnx_ir as ir

    from road_export.passes.merge_decoders import MergeDecodersPass

    decoder = ir.load(directory / SEQ2SEQ_FILES[1])
    with_past = ir.load(directory / SEQ2SEQ_FILES[2])
    merged = MergeDecodersPass(with_past)(decoder).model
    path = directory / SEQ2SEQ_MERGED
    data = save_model(merged, path, external_data, check=post.check_loadable)
    files = []
    stem = Path(SEQ2SEQ_FILES[1]).stem
    for source in sorted(directory.glob(f"{stem}.*.onnx_adapter")):
        target = directory / f"{Path(SEQ2SEQ_MERGED).stem}.{source.name[len(stem) + 1:]}"
        shutil.copyfile(source, target)
        files.append(target)
    meta = decoder.metadata_props
    return ExportResult(path, meta.get("road_export.mode", ""), meta.get("road_export.task"),
                        [i.name for i in merged.graph.inputs], [o.name for o in merged.graph.outputs],
                        road_nodes(decoder) + road_nodes(with_past),
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
