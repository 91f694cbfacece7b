"""The torch source of an export: a base model plus adapters, as the CLI's --base and --adapter name them, and the
independent reference that parity is checked against.

With no --adapter, a base from models/ that carries an `adapter_config.json` (the embedded default does) gets
that adapter with parameters drawn from a fixed seed, so the same command always builds the same model.

The reference: with adapter directories and peft installed, the model peft itself loads
(`AutoModel*.from_pretrained(base)` + `PeftModel.from_pretrained(model, adapter)`, one `load_adapter` per further
adapter), so a fault in road-export's own loading, tying or input handling shows up as a parity failure instead of
being compared with itself. Without peft (or without adapter directories) the reference is road-export's model.
"""

from __future__ import annotations

import copy
import gc
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from road_export.core import requires_export  # noqa: F401  (one clear line without the export extra)
import torch
from torch import nn

from road_export.export import zoo
from road_export.export.adapters import AdapterFile, apply_adapter, read_adapter
from road_export.core.config import CONFIG_NAME, RoadConfig
from road_export.core.errors import RoadError, first_line
from road_export.export.tasks import CAUSAL, PEFT_TASK_TYPES, SEQ2SEQ, normalize_task
from road_export.export.model import get_road_model
from road_export.core.names import check_adapter_name

PEFT_REFERENCE = "peft"
OWN_REFERENCE = "road-export loader"


@dataclass(frozen=True)
class AdapterSpec:
    name: str
    path: Path


def parse_adapter(text: str, index: int) -> AdapterSpec:
    """`[NAME=]PATH`; without NAME the first adapter is "default" and later ones take their folder's name."""
    name, sep, path = text.partition("=")
    if not sep or Path(text).exists():
        name, path = ("default" if index == 0 else Path(text).name), text
    if not path or (sep and not name and not Path(text).exists()):
        raise RoadError(f"--adapter {text!r}: expected [NAME=]PATH")
    check_adapter_name(name, f"--adapter {text}: adapter name")
    return AdapterSpec(name, Path(path))


@dataclass
class Source:
    """road-export's model (what is exported) and the reference parity is judged against."""

    model: nn.Module
    base: str
    adapters: list[str]
    embedded: bool  # adapter drawn from the embedded config and seed
    task: str | None = None  # optimum's task the model was loaded for (None: the checkpoint's own class)
    reference: nn.Module | None = field(default=None, repr=False)
    reference_name: str = OWN_REFERENCE
    deferred: Callable[[], nn.Module] | None = field(default=None, repr=False)  # builds the peft reference later

    @property
    def reference_model(self) -> nn.Module:
        """The peft reference (built now when it was deferred), else road-export's model."""
        if self.reference is None and self.deferred is not None:
            self.reference, self.deferred = self.deferred(), None
        return self.model if self.reference is None else self.reference

    def release_model(self, *, unverified: bool = False) -> None:
        """Drop road-export's model once exported, when the reference is peft's own (built or deferred): verify
        then holds one torch model next to the onnxruntime session, not two.

        Dropping the name is not enough: torch.export keeps its last trace (a graph module holding the traced
        model's own parameter objects) in a module-level map until the next export, and the export leaves
        reference cycles behind, so the weights (for a safetensors base, the map of the whole file) would stay
        resident beside the reference and the onnxruntime session (measured: 3.1 x the weight bytes instead of
        2.2 x on TinyLlama widths). The model is this Source's own (loaded by `load_source`), so its parameters
        and buffers are emptied in place (`Tensor.set_()`), which frees their storage whoever still holds the
        tensor objects, and the cycles are collected.

        `unverified=True`: no parity check follows, so the model is dropped even when it would have been its own
        reference (an export with --no-verify frees it once its weights are written, before quantizing)."""
        if self.reference is None and self.deferred is None and not unverified:
            return
        model, self.model = self.model, None
        if model is not None:
            with torch.no_grad():
                for tensor in [*model.parameters(), *model.buffers()]:
                    tensor.set_()
        del model
        gc.collect()


def resolve_task(task: str | None, adapters: list[AdapterFile]) -> str | None:
    """The task to load for: `--task`, else the adapters' peft `task_type`, else None (the checkpoint's class).

    Raises RoadError when adapters disagree, or `--task` asks for a head other than the one the adapter was
    trained with (its module paths would not fit).
    """
    task = normalize_task(task) if task else None
    kinds = {PEFT_TASK_TYPES[f.config.task_type] for f in adapters if f.config.task_type in PEFT_TASK_TYPES}
    if len(kinds) > 1:
        raise RoadError(f"the adapters were trained for different tasks ({', '.join(sorted(kinds))}); export them "
                        "separately")
    trained = next(iter(kinds), None)
    if task is None:
        return trained
    family = lambda t: "causal" if t in CAUSAL else "seq2seq" if t in SEQ2SEQ else t  # noqa: E731  (with/without past)
    if trained is not None and family(trained) != family(task):
        names = ", ".join(str(f.path) for f in adapters)
        raise RoadError(f"--task {task}: the adapter ({names}) was trained for {trained} (peft task_type); its "
                        f"modules sit in that model class; drop --task or pass --task {trained}")
    return task


def head_labels(base: Path, task: str | None, adapters: list[AdapterFile]) -> int | None:
    """For text-classification: the label count of the head the adapters bring (their modules_to_save tensors
    whose first axis is the config's `num_labels` in the model), or None to keep the checkpoint's.
    Raises RoadError when the base config has no `pad_token_id` (before the model is loaded or traced)."""
    if task != "text-classification":
        return None
    config = zoo.read_config(base)
    if getattr(config, "pad_token_id", None) is None:  # ...ForSequenceClassification pools the last non-pad token
        raise RoadError(f"{base}: text-classification needs the base's pad_token_id (transformers' classifier finds "
                        "each row's last token by it for batch > 1); set pad_token_id in config.json")
    meta = zoo.meta_model(config, task)
    params = dict(meta.named_parameters())
    for adapter in adapters:
        for key, tensor in adapter.extra.items():
            param = params.get(key)
            if param is not None and param.dim() >= 1 and param.shape[0] == config.num_labels \
                    and tensor.ndim == param.dim() and tuple(tensor.shape[1:]) == tuple(param.shape[1:]) \
                    and tensor.shape[0] != param.shape[0]:
                return int(tensor.shape[0])
    return None


def load_source(base: str | None, adapters: list[str], *, seed: int = 0, task: str | None = None,
                reference: bool = True, dtype: torch.dtype = torch.float32, defer_reference: bool = False,
                no_adapter: bool = False) -> Source:
    """Load the base (a directory or a name under models/), put the adapters on it, and build the reference.

    `task` (optimum's name or a synonym) picks the model class; without it the adapters' `task_type` does, else
    the checkpoint's own class. `reference=False` skips the peft reference (export without verify). `dtype` is the
    precision the model is loaded in (float32 unless an export without verify asks for float16).
    `defer_reference`: for a base directory, peft's reference is loaded when `reference_model` is first asked for
    (after the export, once `release_model` dropped the exported model), so two models are never held at once.
    `no_adapter`: the base alone, no adapter (not even the embedded default's); it is its own reference.
    Raises RoadError for bad input (one line: which file, what is wrong).
    """
    base = base or zoo.DEFAULT_MODEL
    specs = [parse_adapter(a, i) for i, a in enumerate(adapters)]
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        twice = sorted({n for n in names if names.count(n) > 1})
        raise RoadError(f"--adapter names must be unique, {', '.join(twice)} given twice (names: {', '.join(names)}); "
                        "use NAME=PATH")
    files = [read_adapter(s.path) for s in specs]  # check every adapter before loading the base
    task = resolve_task(task, files)
    path = zoo.resolve(base)
    num_labels = head_labels(path, task, files)
    brought = tuple(k.removesuffix(".weight").removesuffix(".bias") for f in files for k in f.extra)
    model = zoo.load_model(base, seed=seed, task=task, num_labels=num_labels, allow_missing=brought, dtype=dtype)
    if not specs and no_adapter:
        return Source(model.eval(), base, [], embedded=False, task=task)
    if not specs:
        embedded = path / CONFIG_NAME
        if not embedded.is_file():
            raise RoadError(f"{base}: no adapter given; pass --adapter PATH (a peft RoAd adapter directory)")
        config = RoadConfig.from_pretrained(embedded)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + 1)
            get_road_model(model, config, "default")
        return Source(model.eval(), base, ["default"], embedded=True, task=task)
    defer = defer_reference and not zoo.is_named(base)
    pristine = copy.deepcopy(model) if reference and zoo.is_named(base) and peft_available() else None
    for spec, file in zip(specs, files, strict=True):
        apply_adapter(model, file, spec.name)
    source = Source(model.eval(), base, names, embedded=False, task=task)
    unwrappable = peft_cannot_wrap(model) if reference and peft_available() else None
    if unwrappable:
        # peft's RoAd wraps nn.Linear only: an adapter on Conv1D layers (rx.save_adapter) has no peft model
        source.reference_name = f"{OWN_REFERENCE} (peft cannot wrap {unwrappable})"
    elif reference and peft_available() and defer:
        source.deferred = lambda: peft_reference(_transformers_base(path, task, num_labels), specs)
        source.reference_name = PEFT_REFERENCE
    elif reference and peft_available():
        base_model = pristine if pristine is not None else _transformers_base(path, task, num_labels)
        source.reference = peft_reference(base_model, specs)
        source.reference_name = PEFT_REFERENCE
    return source


def peft_cannot_wrap(model: nn.Module) -> str | None:
    """The layer type(s) of road-export's adapted layers that peft's RoAd does not wrap (it wraps nn.Linear only,
    peft/tuners/road/model.py `_create_new_module`), e.g. transformers' Conv1D; None when all are nn.Linear."""
    from road_export.export.model import road_layers

    kinds = sorted({type(layer.base_layer).__name__ for layer in road_layers(model).values()
                    if not isinstance(layer.base_layer, nn.Linear)})
    return ", ".join(kinds) or None


def load_reference(base: str | Path, adapters: list[str], *, task: str | None = None, seed: int = 0) -> nn.Module:
    """Only the reference: the model peft itself loads for `base` (a directory, or a name under models/ built with
    `seed`) and the adapter directories `adapters` (`[NAME=]PATH`), with the model class `load_source` would pick.

    Raises RoadError without peft installed, without adapters, or for input peft cannot load.
    """
    if not peft_available():
        raise RoadError("the peft reference needs peft installed: pip install 'road-export[peft]'")
    specs = [parse_adapter(a, i) for i, a in enumerate(adapters)]
    if not specs:
        raise RoadError("the peft reference needs at least one adapter directory")
    files = [read_adapter(s.path) for s in specs]
    task = resolve_task(task, files)
    path = zoo.resolve(base)
    num_labels = head_labels(path, task, files)
    if zoo.is_named(base):
        model = zoo.load_model(base, seed=seed, task=task, num_labels=num_labels)
    else:
        model = _transformers_base(path, task, num_labels)
    return peft_reference(model, specs)


def peft_available() -> bool:
    try:
        import peft  # noqa: F401
    except ImportError:
        return False
    return True


def _transformers_base(path: Path, task: str | None, num_labels: int | None) -> nn.Module:
    """The base exactly as transformers loads it (`cls.from_pretrained`, called here and not through road-export's
    loader, so that a fault there cannot reach the reference)."""
    config = zoo.read_config(path)
    if num_labels:
        config.num_labels = num_labels
    cls = zoo.model_class(config, task, where=str(path))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            model = cls.from_pretrained(path, config=config, local_files_only=True, dtype=torch.float32)
        except Exception as e:
            text = first_line(e)
            raise RoadError(f"{path}: transformers cannot load it as {cls.__name__} ({text})") from e
    return model.eval()


def peft_reference(base_model: nn.Module, specs: list[AdapterSpec]) -> nn.Module:
    """`PeftModel.from_pretrained(base_model, first adapter)` plus `load_adapter` for each further one, in eval
    mode with the first adapter active (a mixed batch picks per row with peft's `adapter_names`)."""
    from peft import PeftModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft warns about tied targets; parity says whether it matters
        try:
            model = PeftModel.from_pretrained(base_model, str(specs[0].path), adapter_name=specs[0].name)
            for spec in specs[1:]:
                model.load_adapter(str(spec.path), adapter_name=spec.name)
        except Exception as e:
            text = first_line(e)
            raise RoadError(f"peft cannot load the adapter onto this base ({type(e).__name__}: {text}); "
                            "parity needs peft's own model as the reference") from e
    model.set_adapter(specs[0].name)
    return model.eval()
