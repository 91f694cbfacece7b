"""Shared benchmark helpers: interleaved A/B timing, medians and the median of paired ratios.

Benchmarks time A and B alternately in one process (A B A B ...) so that drift hits both sides equally.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class Comparison:
    name_a: str
    name_b: str
    times_a: list[float]
    times_b: list[float]

    @property
    def median_a(self) -> float:
        return statistics.median(self.times_a)

    @property
    def median_b(self) -> float:
        return statistics.median(self.times_b)

    @property
    def ratio(self) -> float:
        """Median of paired ratios A/B."""
        return statistics.median(a / b for a, b in zip(self.times_a, self.times_b, strict=True))

    def line(self, unit: str = "ms") -> str:
        scale = 1000.0 if unit == "ms" else 1.0
        return (
            f"{self.name_a:>28}: {self.median_a * scale:10.3f} {unit}   {self.name_b:>22}: "
            f"{self.median_b * scale:10.3f} {unit}   ratio {self.name_a}/{self.name_b} = {self.ratio:.3f}x"
        )


def interleave(
    a: Callable[[], object],
    b: Callable[[], object],
    *,
    rounds: int,
    names: tuple[str, str] = ("A", "B"),
    inner: int = 1,
    setup: Callable[[], None] | None = None,
) -> Comparison:
    """Time `a` and `b` alternately `rounds` times; each sample is the mean of `inner` calls."""
    ta: list[float] = []
    tb: list[float] = []
    for _ in range(rounds):
        for fn, out in ((a, ta), (b, tb)):
            if setup is not None:
                setup()
            start = time.perf_counter()
            for _ in range(inner):
                fn()
            out.append((time.perf_counter() - start) / inner)
    return Comparison(names[0], names[1], ta, tb)


def llama_config(hidden: int, layers: int, vocab: int = 4000, **extra):
    """The Llama shape the benchmarks share: heads of 64, 4 query heads per KV head, MLP 2.6875 x hidden."""
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=hidden, intermediate_size=int(hidden * 2.6875) // 64 * 64, num_hidden_layers=layers,
                       num_attention_heads=hidden // 64, num_key_value_heads=max(1, hidden // 256), vocab_size=vocab,
                       **extra)


def engine_runner(directory, models: list[str], new: int, **engine_options):
    """Greedy generation through `road-export serve`'s engine (road_export.app.serving.engine.Engine on `directory`,
    max_batch_size 8, `engine_options` passed on): run(ids [rows, prompt] int64) submits row i for `models[i]`, `new`
    tokens each (ignore_eos), steps until all finish and returns [rows, prompt + new] int64."""
    import numpy as np

    from road_export.app.serving.engine import Engine, GenerationRequest, SamplingParams

    engine = Engine(directory, max_batch_size=8, **engine_options)

    def run(ids):
        params = SamplingParams(max_tokens=new, temperature=0, ignore_eos=True)
        for i, row in enumerate(ids):
            engine.submit(GenerationRequest(models[i], row.tolist(), params, f"r{i}"))
        out: dict[str, list[int]] = {}
        while engine.has_work():
            for o in engine.step():
                out.setdefault(o.request_id, []).extend(o.token_ids)
        return np.array([ids[i].tolist() + out[f"r{i}"] for i in range(len(ids))])

    return run
