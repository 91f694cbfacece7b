"""A small multi-tenant model directory built offline, for the serving tests, the benchmark and trying the server.

`build_example(root)` writes, from a fixed seed and nothing downloaded:

    root/base/        a Llama-shaped transformers checkpoint (models/tiny-llama's config, resized) with a byte-level
                      BPE tokenizer trained here with `tokenizers` (BOS added by its post-processor, a chat template)
    root/adapters/X/  one peft RoAd adapter per name (peft's own `save_pretrained`), init_weights=False
    root/model/       `road-export --base root/base --adapter X=... --mode rotate root/model`: the model directory
                      that `road-export serve` takes (text-generation-with-past, per-row adapter_ids)

It needs the export extras (torch, transformers, peft), imported when called; the server itself does not.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

__all__ = ["ADAPTERS", "CHAT_TEMPLATE", "Example", "build_example"]

# three adapters of the three variants on different modules, so that a row served with the wrong adapter shows
ADAPTERS = {
    "alpha": dict(variant="road_1", group_size=8, target_modules=["q_proj", "v_proj"]),
    "beta": dict(variant="road_4", group_size=16, target_modules=["q_proj", "o_proj", "down_proj"]),
    "gamma": dict(variant="road_2", group_size=8, target_modules="all-linear"),
}
CHAT_TEMPLATE = ("{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}\n"
                 "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
SPECIAL = ["<unk>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]
CORPUS = [
    "RoAd rotates the outputs of a linear layer in pairs of features, one angle and one scale per pair.",
    "Many tenants share one base model; each request names its adapter and the server batches them together.",
    "The quick brown fox jumps over the lazy dog while the server streams tokens to every client.",
    "Ray Serve runs replicas across machines; onnxruntime runs the graph on the CPU with two threads.",
    "Continuous batching lets a request join and leave the running batch between decoding steps.",
    "Zwölf Boxkämpfer jagen Viktor quer über den großen Sylter Deich. Où est la gare? ¿Dónde está?",
]


@dataclass(frozen=True)
class Example:
    """Where `build_example` wrote: the base checkpoint, the adapter directories by name, the model directory."""

    base: Path
    adapters: dict[str, Path]
    model: Path


def _tokenizer(vocab_size: int):
    """A byte-level BPE trained on CORPUS, as transformers' PreTrainedTokenizerFast (BOS added, chat template)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(CORPUS * 4, trainer)
    bos = tokenizer.token_to_id("<s>")
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                             special_tokens=[("<s>", bos)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="</s>", clean_up_tokenization_spaces=False)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_example(root: str | Path, *, adapters: dict[str, dict] | None = None, hidden_size: int = 64,
                  layers: int = 2, heads: int = 4, kv_heads: int = 2, intermediate_size: int | None = None,
                  vocab_size: int = 384, context: int = 128, seed: int = 0) -> Example:
    """Write the base, the adapters and the exported model directory under `root` (see the module docstring).

    adapters: {name: peft RoadConfig keyword arguments} (default ADAPTERS); the model is Llama with the given sizes
    (float32); `vocab_size` is the tokenizer's target size (the model takes the size the trainer reached);
    `context` is max_position_embeddings. Raises RoadError when the export fails (one line).
    """
    import peft
    import torch
    import transformers

    from road_export.app.cli import main
    from road_export.core.errors import RoadError

    root = Path(root)
    adapters = ADAPTERS if adapters is None else adapters
    base_dir, model_dir = root / "base", root / "model"
    tokenizer = _tokenizer(vocab_size)
    config = transformers.LlamaConfig(
        hidden_size=hidden_size, intermediate_size=intermediate_size or 2 * hidden_size, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=context,
        vocab_size=len(tokenizer), tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    base = transformers.LlamaForCausalLM(config).eval()
    base.save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    paths = {}
    for i, (name, options) in enumerate(adapters.items()):
        torch.manual_seed(seed + 1 + i)
        model = transformers.LlamaForCausalLM.from_pretrained(base_dir)
        road = peft.get_peft_model(model, peft.RoadConfig(init_weights=False, task_type="CAUSAL_LM", **options))
        paths[name] = root / "adapters" / name
        road.save_pretrained(paths[name])
    argv = ["--base", str(base_dir), *[f"--adapter={n}={p}" for n, p in paths.items()], "--mode", "rotate",
            "--no-verify", "--quiet", str(model_dir)]
    if main(argv) != 0:
        raise RoadError(f"road-export {' '.join(argv)} failed (see the line above)")
    info = json.loads((model_dir / "config.json").read_text())
    assert info["vocab_size"] == len(tokenizer), info
    return Example(base_dir, paths, model_dir)
