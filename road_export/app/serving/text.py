"""Text in and out of a model directory's tokenizer, without transformers: `tokenizers` and `jinja2` only.

`TextTokenizer` reads `tokenizer.json` (the `tokenizers` library, which transformers' fast tokenizers wrap),
`tokenizer_config.json` for the special tokens and clean-up flag, and the chat template from `chat_template.jinja`
or `tokenizer_config.json`'s `chat_template`, rendered as transformers' `apply_chat_template` renders it
(transformers/utils/chat_template_utils.py `_compile_jinja_template`: a sandboxed jinja2 environment with
trim_blocks, lstrip_blocks, loopcontrols, `raise_exception`, `strftime_now` and a non-escaping `tojson`).

`Detokenizer` turns a growing list of token ids into text deltas for streaming (the prefix/read offsets of
text-generation-inference and vLLM, so that a character split over several byte tokens is sent once complete)
and applies OpenAI's `stop` strings: the text ends before the first stop string, and while streaming the tail that
could still become a stop string is held back.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from road_export.core.errors import RoadError
from road_export.graph.files import read_json_object

__all__ = ["Detokenizer", "TextTokenizer"]


def _token_text(value: Any) -> str | None:
    """A special token from tokenizer_config.json: a string or transformers' AddedToken dict ({"content": ...})."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class TextTokenizer:
    """A model directory's tokenizer: encode, decode, chat template.

    Raises RoadError when the directory has no `tokenizer.json` (serving needs a fast tokenizer: save one with
    `tokenizer.save_pretrained(MODEL_DIR)`), or when it or `tokenizer_config.json` cannot be read.
    """

    def __init__(self, directory: str | Path):
        from tokenizers import Tokenizer

        directory = Path(directory)
        path = directory / "tokenizer.json"
        if not path.is_file():
            raise RoadError(f"{directory}: no tokenizer.json; serving needs the base model's fast tokenizer (save it "
                            f"with tokenizer.save_pretrained('{directory}'))")
        try:
            self.backend = Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises plain Exception subclasses for unreadable files
            raise RoadError(f"{path}: the tokenizers library cannot read it ({e})") from e
        config_path = directory / "tokenizer_config.json"
        fix = f"save the tokenizer again with tokenizer.save_pretrained('{directory}')"
        self.config: dict[str, Any] = read_json_object(config_path, fix) if config_path.is_file() else {}
        self.special = {key: _token_text(self.config.get(key)) for key in
                        ("bos_token", "eos_token", "unk_token", "pad_token")}
        self.clean_up_spaces = bool(self.config.get("clean_up_tokenization_spaces", False))
        template_file = directory / "chat_template.jinja"
        template = template_file.read_text() if template_file.is_file() else self.config.get("chat_template")
        if isinstance(template, list):  # several named templates: transformers uses "default"
            template = next((t.get("template") for t in template
                             if isinstance(t, dict) and t.get("name") == "default"), None)
        self.chat_template: str | None = template if isinstance(template, str) and template.strip() else None
        self._template = None

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    @functools.cached_property
    def max_token_chars(self) -> int:
        """An upper bound on the characters of text one token stands for: 4 x the longest vocabulary entry (at
        least 100, WordPiece's longest word for its unknown token), the 4 a margin for normalizers that drop
        characters. A text longer than the context length times this cannot fit the context."""
        longest = max((len(t) for t in self.backend.get_vocab(with_added_tokens=True)), default=1)
        return 4 * max(longest, 100)

    def token_id(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; the tokenizer's post-processor adds BOS etc. when `add_special_tokens`."""
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids` with special tokens skipped, as transformers' `decode(ids, skip_special_tokens=True)`."""
        text = self.backend.decode(list(ids), skip_special_tokens=True)
        if self.clean_up_spaces:  # transformers' PreTrainedTokenizerBase.clean_up_tokenization
            for old, new in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                             (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
                text = text.replace(old, new)
        return text

    def apply_chat_template(self, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True,
                            **extra: Any) -> str:
        """The prompt text for chat `messages` ([{role, content}]); tokenize it with add_special_tokens=False.

        Raises RoadError when there is no chat template, and ValueError (jinja2's TemplateError) when the
        template refuses the messages (its `raise_exception`)."""
        if self.chat_template is None:
            raise RoadError("the tokenizer has no chat template")
        if self._template is None:
            self._template = _compile(self.chat_template)
        special = {k: v for k, v in self.special.items() if v is not None}
        return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                     **special, **extra)


def _compile(template: str):
    """transformers' chat template environment (see the module docstring), without the generation tracker."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


PROMPT_CONTEXT = 5
"""Prompt tokens decoded before the first generated one (vLLM's INITIAL_INCREMENTAL_DETOKENIZATION_OFFSET)."""


class Detokenizer:
    """Incremental text of one sequence of generated token ids, with OpenAI stop strings.

    `add(token)` returns the text that may be sent now (possibly ""), `finish()` the rest; `stopped` says whether a
    stop string ended the text (the caller then ends generation, finish_reason "stop"). `text` is everything sent.
    `incremental=False` (a caller that sends the text once, at the end): without stop strings `add` only collects
    the ids and `finish` decodes them once; with stop strings it decodes as it goes, since a stop string must end
    generation when it appears.

    `prompt`: the request's prompt ids. The text is what the new tokens add to the last `PROMPT_CONTEXT` of them,
    as vLLM's detokenizer gives it, so that prompt + text is the whole text: a SentencePiece (Metaspace) tokenizer
    decodes a first token "▁Paris" on its own as "Paris" but after the prompt as " Paris". Without a prompt, or
    where the prompt's text is not a prefix of the whole (a character cut by the window), the new ids alone, as
    transformers' `decode(new_ids)` gives them.
    """

    def __init__(self, tokenizer: TextTokenizer, stop: Sequence[str] = (), *, incremental: bool = True,
                 prompt: Sequence[int] = ()):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.incremental = incremental or bool(self.stop)
        self.hold = max((len(s) for s in self.stop), default=1) - 1  # chars that may still start a stop string
        context = [int(t) for t in list(prompt)[-PROMPT_CONTEXT:]]
        self.context_text = tokenizer.decode(context) if context else ""
        if self.context_text.endswith("\ufffd"):
            context, self.context_text = [], ""  # a partial character at the prompt's end: the new ids alone
        self.context = len(context)
        self.ids: list[int] = context  # the context, then the new ids
        self.prefix, self.read = 0, self.context  # offsets into ids: decoded context start, end of what became text
        self.full = ""  # all decoded text so far
        self.text = ""  # all text sent so far (full, cut at a stop string, minus the held tail)
        self.stopped = False

    def add(self, token: int) -> str:
        """Take one token; return the text that is now certain (no partial character, no possible stop string)."""
        if self.stopped:
            return ""
        self.ids.append(int(token))
        if not self.incremental:
            return ""
        before = self.tokenizer.decode(self.ids[self.prefix:self.read])
        after = self.tokenizer.decode(self.ids[self.prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.full += after[len(before):]
            self.prefix, self.read = self.read, len(self.ids)
        return self._release(final=False)

    def finish(self) -> str:
        """The remaining text at the end of generation (a trailing partial character included, as decode does)."""
        if not self.stopped:
            whole = self._new_text()
            self.full = whole if whole.startswith(self.full) else self.full
        return self._release(final=True)

    def _new_text(self) -> str:
        """The text of the new ids after the context, decoded at once."""
        whole = self.tokenizer.decode(self.ids)
        if whole.startswith(self.context_text):
            return whole[len(self.context_text):]
        return self.tokenizer.decode(self.ids[self.context:])

    def _release(self, *, final: bool) -> str:
        if not self.stopped and self.stop:
            start = max(0, len(self.text) - self.hold)
            hits = [i for i in (self.full.find(s, start) for s in self.stop) if i >= 0]
            if hits:
                self.full = self.full[:min(hits)]
                self.stopped = True
        end = len(self.full) if final or self.stopped else max(len(self.text), len(self.full) - self.hold)
        delta = self.full[len(self.text):end]
        self.text += delta
        return delta
