"""A model builder graph (onnxruntime-genai's) against peft's forward: the prefill logits of each adapter, judged by
the harness's rules (comparisons.compare: max abs <= the dtype's tolerance, or cosine for a quantized graph). The
builder path (road_export.app.genai_builder) runs it after attaching RoAd; `road-export verify FILE --base HF` runs
the harness's full case plan on such files (torch_reference, with the cases GroupQueryAttention cannot take
skipped)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from road_export.app.parity.comparisons import TOLERANCE, compare

__all__ = ["verify_builder"]


def verify_builder(onnx_path: Path, base: Path, adapters: list, *, quantized: bool, dtype: str, atol: float | None,
           batch: int = 2, sequence: int = 7, seed: int = 0) -> list[dict]:
    """Prefill logits of a builder graph (past length 0, onnxruntime CPU) against peft's forward on `base` with
    `adapters` [(name, AdapterFile)]: one row per adapter (each swapped in through its `.onnx_adapter` values as
    inputs, or picked by adapter_ids in a mixed graph), or the base alone. Returns rows {"case", "max_abs",
    "cosine", "ok"}, judged by `comparisons.compare` (TOLERANCE of the dtype, or COSINE_MIN and TOKEN_COSINE_MIN
    for a quantized graph). Sessions log fatal messages only, as the harness's do."""
    import torch
    from transformers import AutoModelForCausalLM

    from road_export.graph.ort_session import new_session

    session = new_session(onnx_path).session
    inputs = {i.name: i for i in session.get_inputs()}
    rng = np.random.default_rng(seed)
    torch_dtype = {"float32": torch.float32, "float16": torch.float32, "bfloat16": torch.float32}[dtype]
    reference = AutoModelForCausalLM.from_pretrained(base, dtype=torch_dtype).eval()
    vocab = int(reference.config.vocab_size)
    ids = rng.integers(3, vocab, (batch, sequence)).astype(np.int64)
    feed: dict[str, np.ndarray] = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    if "position_ids" in inputs:  # some builder graphs (e.g. fp16 on the CPU) take them
        feed["position_ids"] = np.broadcast_to(np.arange(sequence, dtype=np.int64), ids.shape).copy()
    for name, info in inputs.items():
        if name.startswith("past_key_values"):
            heads, head = info.shape[1], info.shape[3]
            if not isinstance(head, int):
                head = int(reference.config.hidden_size // reference.config.num_attention_heads)
                head = int(getattr(reference.config, "head_dim", None) or head)
            np_dtype = {"tensor(float)": np.float32, "tensor(float16)": np.float16}.get(info.type, np.float32)
            feed[name] = np.zeros((batch, heads, 0, head), np_dtype)
    if adapters:
        import peft

        model = peft.PeftModel.from_pretrained(reference, adapters[0][1].path, adapter_name=adapters[0][0])
        for name, file in adapters[1:]:
            model.load_adapter(file.path, adapter_name=name)
        model.eval()
    else:
        model = reference
    cases: list[tuple[str, dict, list[str] | None]] = []
    if "adapter_ids" in inputs:
        rows = np.arange(batch, dtype=np.int64) % (len(adapters) + 1)
        for shift in range(0, len(adapters) + 1, batch):
            ids_row = (rows + shift) % (len(adapters) + 1)
            names = ["__base__" if i == 0 else adapters[i - 1][0] for i in ids_row]
            cases.append((f"adapter_ids {ids_row.tolist()}", {"adapter_ids": ids_row}, names))
    elif adapters:
        cases.append((f"adapter {adapters[0][0]}", {}, None))
    else:
        cases.append(("base", {}, None))
    limit = atol if atol is not None else TOLERANCE["float32" if dtype == "float32" else "float16"]
    out = []
    for case, extra, names in cases:
        got = session.run(["logits"], {**feed, **extra})[0].astype(np.float32)
        with torch.no_grad():
            kwargs = {"adapter_names": names} if names is not None else {}
            want = model(torch.from_numpy(ids), **kwargs).logits.float().numpy()
        row = compare("logits", case, got, want, None, limit, logits=True, by_cosine=quantized)
        out.append({"case": case, "max_abs": row.max_abs, "cosine": row.cosine, "ok": bool(row.ok)})
    return out
