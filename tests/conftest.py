"""Shared fixtures: tiny models from models/ built with fixed seeds; nothing is downloaded."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch

from road_export import zoo


def tiny(name: str, seed: int = 0) -> torch.nn.Module:
    """A tiny model from models/<name>, weights from `seed`."""
    return zoo.load_model(name, seed=seed)


def token_inputs(model: torch.nn.Module, batch: int = 2, seq: int = 5, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, model.config.vocab_size, (batch, seq), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def perturbing(load, amount: float):
    """A planted loader fault: `load` (zoo.load_model) whose model gets `amount` added to layer 0's q_proj weight."""
    def faulty(*args, **kwargs):
        model = load(*args, **kwargs)
        with torch.no_grad():
            model.model.layers[0].self_attn.q_proj.weight.add_(amount)
        return model

    return faulty


def first_output(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    for key in ("logits", "last_hidden_state"):
        if key in out:
            return out[key]
    return out[0]


_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session", autouse=True)
def repository_root_untouched():
    """Tests write under tmp_path only: a file that appears in the repository root during the run fails the session
    (a library that writes beside the current directory, e.g. external data, must run under monkeypatch.chdir)."""
    before = set(os.listdir(_ROOT))
    yield
    appeared = sorted(set(os.listdir(_ROOT)) - before - {".pytest_cache", ".hypothesis", "__pycache__"})
    assert not appeared, f"tests wrote into the repository root: {appeared}"


@pytest.fixture
def tmp_dir(tmp_path):
    return tmp_path
