"""Tasks: which inputs a transformers model is exported with, and which outputs it gives (optimum's names)."""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import nn

from road_export.errors import RoadError

TASKS = ("causal-lm", "feature-extraction", "sequence-classification")
ALIASES = {
    "text-generation": "causal-lm",
    "default": "feature-extraction",
    "text-classification": "sequence-classification",
}


@dataclass(frozen=True)
class TaskSpec:
    task: str
    input_names: tuple[str, ...]
    output_name: str
    adapter_order: tuple[str, ...] = ()  # a mixed-adapter graph: adapter of id k is adapter_order[k - 1]


def normalize_task(task: str) -> str:
    task = ALIASES.get(task, task)
    if task not in TASKS:
        raise RoadError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    return task


def infer_task(model: nn.Module) -> str:
    """The task a transformers model class implies (optimum's convention)."""
    name = type(model).__name__
    if name.endswith(("ForCausalLM", "LMHeadModel")):
        return "causal-lm"
    if name.endswith("ForSequenceClassification"):
        return "sequence-classification"
    if name.endswith("Model") and hasattr(model, "config"):
        return "feature-extraction"
    raise RoadError(
        f"cannot infer the task of {name}; pass task= one of {', '.join(TASKS)}, or example_inputs for a plain module"
    )


def task_spec(model: nn.Module, task: str, adapter_order: tuple[str, ...] = ()) -> TaskSpec:
    task = normalize_task(task)
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # a peft wrapper
    params = inspect.signature(inner.forward).parameters
    names = ["input_ids", "attention_mask"]
    if task != "causal-lm" and "token_type_ids" in params and getattr(inner.config, "type_vocab_size", 0):
        names.append("token_type_ids")
    output = {"causal-lm": "logits", "feature-extraction": "last_hidden_state"}.get(task, "logits")
    if adapter_order:
        names.append("adapter_ids")
    return TaskSpec(task, tuple(names), output, tuple(adapter_order))


def sample_inputs(model: nn.Module, spec: TaskSpec, batch: int = 2, seq: int = 8, seed: int = 0,
                  pad: int = 0) -> dict[str, torch.Tensor]:
    """Token ids within the vocabulary and an attention mask (`pad` left-padded positions in row 0)."""
    gen = torch.Generator().manual_seed(seed)
    vocab = int(model.config.vocab_size)
    ids = torch.randint(min(3, vocab - 1), vocab, (batch, seq), generator=gen)
    mask = torch.ones(batch, seq, dtype=torch.int64)
    if pad:
        mask[0, :pad] = 0
    inputs = {"input_ids": ids, "attention_mask": mask}
    if "token_type_ids" in spec.input_names:
        inputs["token_type_ids"] = torch.zeros(batch, seq, dtype=torch.int64)
    if spec.adapter_order:
        inputs["adapter_ids"] = (torch.arange(batch, dtype=torch.int64) + 1) % (len(spec.adapter_order) + 1)
    return inputs


class TaskModule(nn.Module):
    """Calls a transformers model with named inputs and returns only the task's output tensor.

    The wrapped model is registered under the name `model`, so exported initializers are `model.<path>`.
    """

    def __init__(self, model: nn.Module, spec: TaskSpec) -> None:
        super().__init__()
        self.model = model
        self.spec = spec

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
        adapter_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if adapter_ids is not None:
            from road_export.model import adapter_ids as rows

            with rows(self.model, adapter_ids, self.spec.adapter_order):
                return self._call(input_ids, attention_mask, token_type_ids)
        return self._call(input_ids, attention_mask, token_type_ids)

    def _call(self, input_ids, attention_mask, token_type_ids) -> torch.Tensor:
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids
        if self.spec.task == "causal-lm":
            kwargs["use_cache"] = False
        out = self.model(**kwargs, return_dict=True)
        return out[self.spec.output_name]
