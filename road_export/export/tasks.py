"""Tasks: which inputs a transformers model is exported with, and which outputs it gives (optimum's names)."""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import nn

from road_export.core.errors import RoadError
from road_export.core.names import BATCH, PAST_SEQUENCE, SEQUENCE, positions

TASKS = ("text-generation", "text-generation-with-past", "feature-extraction", "text-classification",
         "text2text-generation", "text2text-generation-with-past")
SEQ2SEQ = ("text2text-generation", "text2text-generation-with-past")  # encoder-decoder: export/seq2seq.py
# Earlier names (road-export 0.1 wrote "causal-lm" and "sequence-classification" into files): accepted everywhere.
ALIASES = {
    "causal-lm": "text-generation",
    "causal-lm-with-past": "text-generation-with-past",
    "default": "feature-extraction",
    "sequence-classification": "text-classification",
}
CAUSAL = ("text-generation", "text-generation-with-past")
# peft's TaskType -> optimum's task, for choosing the model class from an adapter's `task_type`
PEFT_TASK_TYPES = {"CAUSAL_LM": "text-generation", "SEQ_CLS": "text-classification",
                   "FEATURE_EXTRACTION": "feature-extraction", "SEQ_2_SEQ_LM": "text2text-generation"}


@dataclass(frozen=True)
class CacheSpec:
    """The key/value cache of a decoder: one key and one value per layer, [batch, kv_heads, past, head_dim]."""

    layers: int
    key_shape: tuple[tuple[int, int], ...]  # (kv_heads, head_dim) of each layer's key
    value_shape: tuple[tuple[int, int], ...]
    position_ids: bool  # the graph takes position_ids

    @property
    def past_names(self) -> tuple[str, ...]:
        return tuple(f"past_key_values.{i}.{kv}" for i in range(self.layers) for kv in ("key", "value"))

    @property
    def past_dims(self) -> tuple[tuple[int, int], ...]:
        """(kv_heads, head_dim) of each past input, in `past_names` order."""
        return tuple(dims for pair in zip(self.key_shape, self.value_shape, strict=True) for dims in pair)

    @property
    def present_names(self) -> tuple[str, ...]:
        return tuple(f"present.{i}.{kv}" for i in range(self.layers) for kv in ("key", "value"))


@dataclass(frozen=True)
class TaskSpec:
    task: str
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    adapter_order: tuple[str, ...] = ()  # a mixed-adapter graph: adapter of id k is adapter_order[k - 1]
    cache: CacheSpec | None = None  # text-generation-with-past

    @property
    def output_name(self) -> str:
        return self.output_names[0]


def normalize_task(task: str) -> str:
    """optimum's name of `task`; the earlier names (`causal-lm`, `sequence-classification`) are synonyms.

    Raises RoadError for a task road-export does not export.
    """
    task = ALIASES.get(task, task)
    if task not in TASKS:
        raise RoadError(f"unknown task {task!r}; choose one of {', '.join(TASKS)} "
                        f"(or the synonyms {', '.join(ALIASES)})")
    return task


def auto_class(task: str):
    """The transformers Auto class that serves `task` (optimum's task -> class table, for the tasks we export)."""
    import transformers

    return {"text-generation": transformers.AutoModelForCausalLM,
            "text-generation-with-past": transformers.AutoModelForCausalLM,
            "feature-extraction": transformers.AutoModel,
            "text-classification": transformers.AutoModelForSequenceClassification,
            "text2text-generation": transformers.AutoModelForSeq2SeqLM,
            "text2text-generation-with-past": transformers.AutoModelForSeq2SeqLM}[normalize_task(task)]


def uses_absolute_positions(model: nn.Module) -> bool:
    """Whether the model's outputs change when the same tokens sit at other positions (learned absolute position
    embeddings: GPT-2, OPT, ...), found by one probe instead of a list of model types.

    Two tokens are run at positions (0, 1) and (3, 4): rotary and ALiBi models give the same logits (their attention
    sees relative positions only), absolute-position models do not. A model whose forward takes no `position_ids`
    computes its positions itself and is reported False.
    """
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    if "position_ids" not in inspect.signature(inner.forward).parameters or not hasattr(inner, "config"):
        return False
    vocab = int(getattr(inner.config, "vocab_size", 0) or 0)
    if vocab < 2:
        return False
    ids = torch.tensor([[min(3, vocab - 1), vocab - 1]], dtype=torch.int64)
    was_training = inner.training
    inner.eval()
    try:
        with torch.no_grad():
            outs = [_first_tensor(inner(input_ids=ids, position_ids=torch.arange(start, start + 2)[None],
                                        use_cache=False, return_dict=True)).float()
                    for start in (0, 3)]
    except Exception:  # a model that rejects explicit positions computes them itself
        return False
    finally:
        inner.train(was_training)
    scale = float(outs[0].abs().max()) or 1.0
    return float((outs[0] - outs[1]).abs().max()) > 1e-4 * scale


def _first_tensor(out) -> torch.Tensor:
    for key in ("logits", "last_hidden_state"):
        value = getattr(out, key, None)
        if value is not None:
            return value
    return out[0]


def infer_task(model: nn.Module) -> str:
    """The task a transformers model class implies (optimum's convention); a peft wrapper by its base model."""
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    name = type(model).__name__
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(getattr(inner, "config", None), "is_encoder_decoder", False) and hasattr(inner, "get_encoder") \
            and hasattr(inner, "lm_head"):
        return "text2text-generation"  # T5ForConditionalGeneration, BartForConditionalGeneration, MarianMTModel
    if name.endswith(("ForCausalLM", "LMHeadModel")):
        return "text-generation"
    if name.endswith("ForSequenceClassification"):
        return "text-classification"
    if name.endswith("Model") and hasattr(model, "config"):
        return "feature-extraction"
    error = RoadError(
        f"cannot infer the task of {name}; pass task= one of {', '.join(TASKS)}, or example_inputs for a plain module"
    )
    error.cli_message = f"cannot infer the task of {name}; pass --task, one of {', '.join(TASKS)}"
    raise error


def task_spec(model: nn.Module, task: str, adapter_order: tuple[str, ...] = (),
              positions: bool | None = None) -> TaskSpec:
    """Inputs and outputs of `task` for `model` (optimum's names and order).

    A `text-generation` graph takes `position_ids` when the model's outputs depend on absolute positions
    (`uses_absolute_positions`, a probe that runs the model), so a left-padded row runs at the positions
    transformers' generate gives it; `positions` answers that without the probe (verify reads it off the file's
    inputs). `text-generation-with-past` takes them whenever the forward accepts them.
    """
    task = normalize_task(task)
    if task in SEQ2SEQ:
        raise RoadError(f"task {task} is exported as an encoder and decoder files (road_export.export.seq2seq); "
                        "give a directory as the output")
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # a peft wrapper
    params = inspect.signature(inner.forward).parameters
    names = ["input_ids", "attention_mask"]
    causal = task in CAUSAL
    if not causal and "token_type_ids" in params and getattr(inner.config, "type_vocab_size", 0):
        names.append("token_type_ids")
    if task == "text-generation" and (uses_absolute_positions(inner) if positions is None else positions):
        names.append("position_ids")
    outputs = ["last_hidden_state" if task == "feature-extraction" else "logits"]
    cache = None
    if task == "text-generation-with-past":
        cache = cache_spec(inner)
        if cache.position_ids:
            names.append("position_ids")
        names += cache.past_names
        outputs += cache.present_names
    if adapter_order:
        names.append("adapter_ids")
    return TaskSpec(task, tuple(names), tuple(outputs), tuple(adapter_order), cache)


def cache_keyword(model: nn.Module) -> str:
    """The forward argument that takes the cache: `cache` in transformers 5, `past_key_values` before."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def cache_spec(model: nn.Module) -> CacheSpec:
    """Read the cache layout off one two-token forward pass, so head counts and sizes are the model's own."""
    if not hasattr(model, "config") or not hasattr(model.config, "vocab_size"):
        raise RoadError(f"{type(model).__name__} is not a transformers model; text-generation-with-past needs one")
    params = inspect.signature(model.forward).parameters
    name = type(model).__name__
    if infer_task(model) != "text-generation" or cache_keyword(model) not in params or "use_cache" not in params:
        raise RoadError(f"text-generation-with-past needs a causal language model with a key/value cache; "
                        f"{name} is not one (choose another --task)")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(input_ids=torch.ones(1, 2, dtype=torch.int64), use_cache=True, return_dict=True)
    finally:
        model.train(was_training)
    cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
    layers = getattr(cache, "layers", None)
    if not layers or any(getattr(layer, "keys", None) is None for layer in layers):
        raise RoadError(f"{name} returned no per-layer key/value cache; export it with --task text-generation")
    if any(layer.keys.dim() != 4 or layer.keys.shape[2] != 2 for layer in layers):
        raise RoadError(f"{name}: cache tensors are not [batch, heads, sequence, head_dim]; "
                        "export it with --task text-generation")
    return CacheSpec(
        layers=len(layers),
        key_shape=tuple((int(layer.keys.shape[1]), int(layer.keys.shape[3])) for layer in layers),
        value_shape=tuple((int(layer.values.shape[1]), int(layer.values.shape[3])) for layer in layers),
        position_ids="position_ids" in params,
    )


def sample_inputs(model: nn.Module, spec: TaskSpec, batch: int = 2, seq: int = 8, seed: int = 0,
                  pad: int = 0, past: int = 0) -> dict[str, torch.Tensor]:
    """Token ids within the vocabulary and an attention mask (`pad` left-padded positions in row 0).

    With a cache (text-generation-with-past): `past` cached positions of random keys and values, an attention mask
    over past + new positions and the positions that follow from it; past 0 is the prefill.
    """
    gen = torch.Generator().manual_seed(seed)
    vocab = int(model.config.vocab_size)
    ids = torch.randint(min(3, vocab - 1), vocab, (batch, seq), generator=gen)
    total = seq + (past if spec.cache else 0)
    mask = torch.ones(batch, total, dtype=torch.int64)
    if pad:
        mask[0, :pad] = 0
    inputs = {"input_ids": ids, "attention_mask": mask}
    if "token_type_ids" in spec.input_names:
        inputs["token_type_ids"] = torch.zeros(batch, seq, dtype=torch.int64)
    if "position_ids" in spec.input_names:  # transformers' positions for the mask, as generate computes them
        inputs["position_ids"] = torch.from_numpy(positions(mask.numpy()))[:, -seq:]
    if spec.cache:
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
        for name, (heads, dim) in zip(spec.cache.past_names, spec.cache.past_dims, strict=True):
            inputs[name] = torch.randn(batch, heads, past, dim, generator=gen).to(dtype)
    if spec.adapter_order:
        inputs["adapter_ids"] = (torch.arange(batch, dtype=torch.int64) + 1) % (len(spec.adapter_order) + 1)
    return inputs


def trace_inputs(model: nn.Module, spec: TaskSpec) -> dict:
    """Inputs to trace with, as the module's keyword arguments (the cache as one list).

    Sizes differ and none is 0 or 1, so torch.export keeps batch, sequence and past length symbolic.
    """
    flat = sample_inputs(model, spec, batch=3, seq=3 if spec.cache else 8, past=5)
    return nest(spec, flat)


def nest(spec: TaskSpec, flat: dict[str, torch.Tensor]) -> dict:
    """Flat named inputs -> TaskModule keyword arguments, in input order (the cache tensors as one list)."""
    out: dict = {}
    for name in spec.input_names:
        if spec.cache and name in spec.cache.past_names:
            out.setdefault("past_key_values", []).append(flat[name])
        else:
            out[name] = flat[name]
    return out


def dynamic_shapes(spec: TaskSpec) -> dict:
    """torch.export dynamic dimensions for `nest(spec, ...)`, named as optimum names them (road_export.core.names).

    The attention mask's length under a cache is traced as its own symbol `total_sequence_length` (torch wants
    identifiers); the exporter renames it to optimum's `past_sequence_length + sequence_length` in the file."""
    out: dict = {}
    for name in spec.input_names:
        if spec.cache and name in spec.cache.past_names:
            out.setdefault("past_key_values", []).append({0: BATCH, 2: PAST_SEQUENCE})
        elif name == "adapter_ids":
            out[name] = {0: BATCH}
        elif name == "attention_mask" and spec.cache:
            out[name] = {0: BATCH, 1: "total_sequence_length"}
        else:
            out[name] = {0: BATCH, 1: SEQUENCE}
    return out


class TaskModule(nn.Module):
    """Calls a transformers model with named inputs and returns only the task's outputs.

    The wrapped model is registered under the name `model`, so exported initializers are `model.<path>`.
    With a cache the inputs' past keys/values (a list, key and value per layer) fill a DynamicCache, and the
    outputs are logits and the cache after the step, flattened the same way.
    """

    def __init__(self, model: nn.Module, spec: TaskSpec) -> None:
        super().__init__()
        self.model = model
        self.spec = spec
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.cache_keyword = cache_keyword(inner) if spec.cache else None

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: list[torch.Tensor] | None = None,
        adapter_ids: torch.Tensor | None = None,
    ):
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids
        if position_ids is not None:
            kwargs["position_ids"] = position_ids
        if adapter_ids is not None and hasattr(self.model, "peft_config"):  # a peft reference: its own routing
            order = self.spec.adapter_order
            kwargs["adapter_names"] = [order[i - 1] if i else "__base__" for i in adapter_ids.tolist()]
            return self._call(kwargs, past_key_values)
        if adapter_ids is not None:
            from road_export.export.model import adapter_ids as rows

            with rows(self.model, adapter_ids, self.spec.adapter_order):
                return self._call(kwargs, past_key_values)
        return self._call(kwargs, past_key_values)

    def _call(self, kwargs: dict, past: list[torch.Tensor] | None):
        if self.spec.cache is None:
            if self.spec.task == "text-generation":
                kwargs["use_cache"] = False
            return self.model(**kwargs, return_dict=True)[self.spec.output_name]
        from transformers import DynamicCache

        past = list(past or [])
        if len(past) != 2 * self.spec.cache.layers:
            raise RoadError(f"expected {2 * self.spec.cache.layers} past key/value tensors, got {len(past)}")
        # no config: every layer keeps all positions, as optimum's convention has it (windows are in the mask)
        cache = DynamicCache(ddp_cache_data=[(past[2 * i], past[2 * i + 1]) for i in range(self.spec.cache.layers)])
        kwargs[self.cache_keyword] = cache
        out = self.model(**kwargs, use_cache=True, return_dict=True)
        present = getattr(out, "cache", None) or out.past_key_values
        flat = [t for layer in present.layers for t in (layer.keys, layer.values)]
        return (out.logits, *flat)
