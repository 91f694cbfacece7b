"""Base models: a user's transformers directory loaded with `from_pretrained`, or a tiny config from `models/`.

A path is loaded only by transformers (`from_pretrained` reads every layout it knows: single or sharded safetensors,
legacy `pytorch_model*.bin` with its index, ...); a directory transformers finds no weights in is refused, never
filled with random weights. A name (`default`, `tiny-llama`, ...) that is not a path is looked up under the models
directory and built from its `config.json` with a fixed seed: those configs have no weights by design.
"""

from __future__ import annotations

import importlib.resources
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from road_export.core.errors import RoadError, first_line

DEFAULT_MODEL = "default"


def models_dir() -> Path:
    """`$ROAD_EXPORT_MODELS`, else the installed package data `road_export.models` (importlib.resources), else the
    repository's `models/` beside the package (a checkout on PYTHONPATH, not installed)."""
    env = os.environ.get("ROAD_EXPORT_MODELS")
    if env:
        return Path(env)
    try:
        root = importlib.resources.files("road_export.models")
    except ModuleNotFoundError:
        root = None
    if isinstance(root, Path) and root.is_dir():
        return root
    return Path(__file__).resolve().parent.parent.parent / "models"


def list_models() -> list[str]:
    """Names of the model directories under `models_dir()` (those holding a config.json), sorted."""
    root = models_dir()
    return sorted(p.name for p in root.iterdir() if (p / "config.json").is_file()) if root.is_dir() else []


def resolve(name_or_path: str | Path) -> Path:
    """The model directory for a name under models/ or a path."""
    path = Path(name_or_path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise RoadError(f"{path}: not a transformers model directory (no config.json)")
        return path
    if path.exists():
        raise RoadError(f"{path}: expected a model directory, got a file")
    named = models_dir() / str(name_or_path)
    if (named / "config.json").is_file():
        return named
    raise RoadError(
        f"{name_or_path}: no such model directory, and not a model under {models_dir()} "
        f"(known: {', '.join(list_models()) or 'none'})"
    )


def is_named(name_or_path: str | Path) -> bool:
    """True for a name of a model under models/ (built from config), False for a path the user gave."""
    return not Path(name_or_path).exists() and (models_dir() / str(name_or_path) / "config.json").is_file()


def read_config(path: Path):
    import transformers

    try:
        return transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    except Exception as e:
        raise RoadError(f"{path / 'config.json'}: cannot read the model config ({first_line(e)})") from e


def load_model(name_or_path: str | Path = DEFAULT_MODEL, *, seed: int = 0, task: str | None = None,
               num_labels: int | None = None, allow_missing: tuple[str, ...] = (),
               dtype: torch.dtype = torch.float32) -> nn.Module:
    """A transformers model in eval mode, float32 (or `dtype`: export without verify loads a float16 export's model
    in float16, so no float32 copy is ever held): `from_pretrained` for a path, built from config with `seed` for
    a name under models/.

    `task` (optimum's name) picks the Auto class; without it the checkpoint's own class (`config.architectures`).
    `num_labels` sets the classification head's size. Weights that the checkpoint lacks and transformers would
    initialise at random are refused, unless `allow_missing` names them (an adapter brings them: modules_to_save)
    or they feed none of the outputs the task exports (`feeds_no_output`: a pooler under feature-extraction).
    Raises RoadError for a directory without loadable weights, a task the model cannot serve, or a broken file.
    """
    path = resolve(name_or_path)
    config = read_config(path)
    if num_labels:
        config.num_labels = num_labels
    cls = model_class(config, task, where=str(path))
    try:
        if is_named(name_or_path):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                model = cls._from_config(config, dtype=dtype)
        else:
            model = from_pretrained(cls, path, config, allow_missing, dtype=dtype, task=task)
    except RoadError:
        raise
    except Exception as e:
        raise RoadError(f"{path}: cannot load the model ({type(e).__name__}: {first_line(e)})") from e
    model.config.name_or_path = str(name_or_path)
    return model.eval()


def from_pretrained(cls: type, path: Path, config, allow_missing: tuple[str, ...] = (),
                    dtype: torch.dtype = torch.float32, task: str | None = None) -> nn.Module:
    """`cls.from_pretrained(path)` in float32 (or `dtype`), offline; a directory without weights is refused, and so
    are missing weights that feed an output `task` exports (transformers itself would fill them with random values);
    missing ones that feed none (`feeds_no_output`) stay as transformers initialised them, as peft loads them."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            model, info = cls.from_pretrained(path, config=config, local_files_only=True, dtype=dtype,
                                              output_loading_info=True)
        except OSError as e:
            raise RoadError(f"{path}: no weights transformers can load ({first_line(e)}); a base directory needs "
                            "its weights (save it with save_pretrained); only names under models/ are built from "
                            "config") from e
    missing = [k for k in info.get("missing_keys", ()) if not any(k == a or k.startswith(a + ".")
                                                                  for a in allow_missing)]
    if missing:
        unused = set(feeds_no_output(model, missing, task))
        missing = [k for k in missing if k not in unused]
    if missing:
        shown = ", ".join(sorted(missing)[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise RoadError(f"{path}: {len(missing)} weight(s) of {cls.__name__} are not in the checkpoint ({shown}); "
                        "transformers would draw them at random; is this the right --task or checkpoint?")
    return model


def feeds_no_output(model: nn.Module, names: list[str], task: str | None = None) -> list[str]:
    """Those of the parameters `names` that no output exported for `task` depends on (None: the task the model
    class implies, `export.tasks.infer_task`), e.g. RobertaModel's pooler under feature-extraction, whose
    `last_hidden_state` it does not feed (roberta-large's masked-LM checkpoint ships no pooler).

    Found by autograd, not by name: one forward pass of two tokens (encoder-decoders: the same two as decoder
    input), and the gradient of every exported output (logits or last_hidden_state, and the key/value cache a
    `-with-past` export returns) with respect to those parameters; a parameter with no gradient path feeds none.
    Buffers, and anything the probe cannot run, are reported as feeding (the caller stays strict)."""
    from road_export.export.tasks import _first_tensor, infer_task, normalize_task

    params = dict(model.named_parameters())
    wanted = [params.get(n) for n in names]
    vocab = int(getattr(getattr(model, "config", None), "vocab_size", 0) or 0)
    if not names or any(p is None or not p.is_floating_point() for p in wanted) or vocab < 2:
        return []
    try:
        task = normalize_task(task) if task else infer_task(model)
        ids = torch.tensor([[min(3, vocab - 1), vocab - 1]], dtype=torch.int64)
        kwargs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "return_dict": True}
        if task.startswith("text2text"):
            kwargs["decoder_input_ids"] = ids
        was = [p.requires_grad for p in wanted]
        for p in wanted:
            p.requires_grad_(True)
        try:
            with torch.enable_grad():
                out = model(**kwargs)
                outputs = [_first_tensor(out)]
                if task.endswith("-with-past") or task.startswith("text2text"):
                    cache = getattr(out, "past_key_values", None)
                    layers = getattr(getattr(cache, "self_attention_cache", cache), "layers", None) or []
                    outputs += [t for layer in layers for t in (getattr(layer, "keys", None),
                                                                 getattr(layer, "values", None)) if t is not None]
                    outputs.append(getattr(out, "encoder_last_hidden_state", None))
                total = sum(t.float().sum() for t in outputs if isinstance(t, torch.Tensor) and t.requires_grad)
                if not isinstance(total, torch.Tensor):
                    return []
                grads = torch.autograd.grad(total, wanted, allow_unused=True)
        finally:
            for p, flag in zip(wanted, was, strict=True):
                p.requires_grad_(flag)
    except Exception:  # the probe could not run: nothing is excused
        return []
    return [n for n, g in zip(names, grads, strict=True) if g is None]


def model_class(config, task: str | None = None, *, where: str = "") -> type:
    """The transformers class for `task` (its Auto class's choice for this config), or without a task the class
    named by `config.architectures` (else the base AutoModel's). Raises RoadError when the model cannot serve it."""
    import transformers

    from road_export.export.tasks import auto_class, normalize_task

    if task is None:
        for arch in getattr(config, "architectures", None) or []:
            cls = getattr(transformers, arch, None)
            if cls is not None:
                return cls
        auto = transformers.AutoModel
    else:
        auto = auto_class(task)
    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return type(auto.from_config(config))
    except ValueError as e:
        what = f"task {normalize_task(task)}" if task else "a base model"
        raise RoadError(f"{where or config.model_type}: model type {config.model_type!r} cannot serve {what} "
                        f"(transformers has no {auto.__name__} class for it); choose another --task") from e


def meta_model(config, task: str | None = None) -> nn.Module:
    """The model's modules with no storage (device "meta"): layer types and tied parameters, at no memory cost."""
    cls = model_class(config, task)
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cls._from_config(config)


def tied_groups(model: nn.Module) -> list[list[str]]:
    """Parameter names that share one tensor (transformers' tied weights, e.g. lm_head.weight and the input
    embedding), each group in module order; found by identity, as the model ties them, not from a name list."""
    by_id: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(param), []).append(name)
    return [names for names in by_id.values() if len(names) > 1]

