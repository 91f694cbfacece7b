"""Running an encoder-decoder export (road_export.export.seq2seq's three files) on onnxruntime, torch-free.

`Seq2SeqSession(directory)` opens `encoder_model.onnx`, `decoder_model.onnx` and, when there,
`decoder_with_past_model.onnx` (in the directory or its `onnx/` folder, as optimum and transformers.js place them),
each as a `RoadSession`, so adapter routing (a swapped `.onnx_adapter`, or `adapter_ids` rows) is the one the
single-file runtime has. `road_export.runtime.sessions.open_session(directory)` returns one for such a directory.

Generation mirrors transformers' `generate` for encoder-decoder models (GenerationMixin: `_prepare_encoder_decoder_
kwargs_for_generation`, `_prepare_decoder_input_ids_for_generation`): the encoder runs once; the decoder starts from
`decoder_start_token_id`, its first step (decoder_model.onnx) also returns the cross-attention keys/values, which are
then fed unchanged to every later step (decoder_with_past_model.onnx) with the growing self-attention cache. The
result is the decoder's tokens, starting with `decoder_start_token_id`, rows that finished padded with
`pad_token_id`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np

from road_export.core.errors import RoadError
from road_export.graph.files import read_json_object
from road_export.runtime.generation import Decoding, Sampling, Step, _prompt, decode, host_pick, host_run
from road_export.core.names import METADATA_SEQ2SEQ, PAST, PRESENT, SEQ2SEQ_FILES, SEQ2SEQ_MERGED, read_record

__all__ = ["Seq2SeqSession", "convert_adapter", "find_files", "is_seq2seq_dir"]

ENCODER, DECODER, DECODER_WITH_PAST = SEQ2SEQ_FILES


def find_files(directory: str | Path) -> dict[str, Path] | None:
    """{file name: path} of an encoder-decoder export in `directory` or `directory/onnx`, or None if there is none
    (an encoder and a decoder are both needed; the decoder with past and the merged decoder are optional; generation
    runs the two decoder files, the merged one is for clients that load only it)."""
    directory = Path(directory)
    for folder in (directory / "onnx", directory):
        if (folder / ENCODER).is_file() and (folder / DECODER).is_file():
            return {name: folder / name for name in (*SEQ2SEQ_FILES, SEQ2SEQ_MERGED) if (folder / name).is_file()}
    return None


def is_seq2seq_dir(path: str | Path) -> bool:
    """Whether `path` is a directory holding an encoder-decoder export."""
    return Path(path).is_dir() and find_files(path) is not None


def convert_adapter(adapter_dir: str | Path, directory: str | Path, name: str) -> dict[str, Path]:
    """A peft RoAd adapter directory -> one `.onnx_adapter` per file of a swappable encoder-decoder export that holds
    rotations, written beside it as `<file stem>.<name>.onnx_adapter` (so `open_session(directory)` finds it);
    returns {onnx file name: adapter file}. Each file takes the adapter's layers that run in it
    (`swap.convert_adapter(..., other_files=True)`). Raises RoadError when the adapter does not fit a file, or no
    file of the directory is swappable."""
    from road_export.graph import swap

    files = find_files(directory)
    if files is None:
        raise RoadError(f"{directory}: no {ENCODER} and {DECODER} in it or in its onnx/ folder")
    out = {}
    for file_name, path in files.items():
        try:
            swap.swap_records(path)
        except RoadError:
            continue  # no rotations in this file (or a merged export: refused below)
        out[file_name] = swap.convert_adapter(adapter_dir, path, swap.adapter_file_path(path, name), other_files=True)
    if not out:
        raise RoadError(f"{directory}: no swappable file; export one adapter with --mode rotate")
    return out


class Seq2SeqSession:
    """An encoder-decoder export on onnxruntime: `encoder`, `decoder`, `decoder_with_past` (or None) are
    `RoadSession`s; `generate` and `stream` decode, `run_encoder` / `run_decoder` run one part.

    `threads`, `providers`, `native`, `session_config`, `fuse` as for `RoadSession` (each file opens with them;
    `fused` sums the files' fused nodes). Generation defaults (`decoder_start_token_id`,
    `eos_token_id`, `pad_token_id`) come from the directory's `generation_config.json`, else `config.json`, else
    the ids the exporter recorded in the decoder's metadata. Raises RoadError for a directory without the files.
    """

    def __init__(self, directory: str | Path, *, threads: int | None = None, providers: Sequence[str] | None = None,
                 native: bool | None = None, session_config: Mapping[str, str] | None = None, fuse: bool = True):
        from road_export.runtime.session import RoadSession

        self.path = Path(directory)
        files = find_files(self.path)
        if files is None:
            raise RoadError(f"{self.path}: no {ENCODER} and {DECODER} in it or in its onnx/ folder; give a directory "
                            "written by road-export for an encoder-decoder model")
        opts = {"threads": threads, "providers": providers, "native": native, "session_config": session_config,
                "fuse": fuse}
        self.encoder = RoadSession(files[ENCODER], **opts)
        self.decoder = RoadSession(files[DECODER], **opts)
        self.decoder_with_past = RoadSession(files[DECODER_WITH_PAST], **opts) if DECODER_WITH_PAST in files else None
        self.mode = self.decoder.mode
        self.adapters = list(dict.fromkeys(a for s in self.sessions for a in s.adapters))
        self.config = self._generation_config(files[DECODER])

    @property
    def fused(self) -> int:
        """MatMul + rotation pairs running as one `road.MatMulRotate` node, over the files (CUDA only)."""
        return sum(s.fused for s in self.sessions)

    @property
    def sessions(self) -> list:
        return [s for s in (self.encoder, self.decoder, self.decoder_with_past) if s is not None]

    def load_adapter(self, name: str, files: dict[str, str | Path]) -> str:
        """Make an adapter selectable by name from `.onnx_adapter` files, one per file that holds rotations:
        {onnx file name (e.g. "decoder_model.onnx"): adapter file}. Raises RoadError when a file with rotations
        gets none, or a file without any gets one."""
        by_file = {s.path.name: s for s in self.sessions}
        files = {k: v for k, v in files.items() if k != SEQ2SEQ_MERGED}  # not run here (see find_files)
        unknown = sorted(set(files) - set(by_file))
        if unknown:
            raise RoadError(f"{self.path}: no ONNX file {', '.join(unknown)}; it has {sorted(by_file)}")
        swappable = {n for n, s in by_file.items() if s._swap_records is not None}
        if set(files) != swappable:
            raise RoadError(f"adapter {name!r}: give one .onnx_adapter for each of {sorted(swappable)} (the files "
                            f"holding rotations), got {sorted(files)}")
        for file_name, adapter in files.items():
            by_file[file_name].load_adapter(adapter, name)
        if name not in self.adapters:
            self.adapters.append(name)
        return name

    def _generation_config(self, decoder_file: Path) -> dict:
        out: dict = {}
        meta = self.decoder.session.get_modelmeta().custom_metadata_map
        out.update({k: v for k, v in read_record(meta, METADATA_SEQ2SEQ, str(decoder_file), {}).items() if k != "part"})
        for name in ("config.json", "generation_config.json"):  # the latter wins, as in transformers
            for folder in (self.path, decoder_file.parent):
                path = folder / name
                if path.is_file():
                    data = read_json_object(path, "fix it, or export the model again")
                    out.update({k: data[k] for k in ("decoder_start_token_id", "eos_token_id", "pad_token_id")
                                if data.get(k) is not None})
                    break
        return out

    def _route(self, session, batch: int, adapter, adapter_names):
        """A part's feeds and run options for the adapters asked for. In a rotate export, a part in which no
        adapted layer runs (no adapter records: the seed's T5 example leaves the encoder alone) runs as it is; the
        names are still checked against the model's."""
        if session.mode == "rotate" and not session.adapters:
            names = [adapter] if adapter is not None else list(adapter_names or [])
            unknown = sorted(set(names) - set(self.adapters) - {"__base__"})
            if unknown:
                raise RoadError(f"{self.path.name} has no adapter {', '.join(unknown)}; it has {self.adapters}")
            return {}, None
        return session.route(batch, adapter=adapter, adapter_names=adapter_names)

    def run_encoder(self, input_ids, attention_mask, *, adapter: str | None = None,
                    adapter_names: Sequence[str] | None = None) -> np.ndarray:
        """last_hidden_state [batch, encoder_sequence_length, hidden] for left- or right-padded prompts."""
        feeds = self.encoder.check_feeds({"input_ids": input_ids, "attention_mask": attention_mask})
        route, options = self._route(self.encoder, feeds["input_ids"].shape[0], adapter, adapter_names)
        return self.encoder.run_feeds(["last_hidden_state"], {**feeds, **route}, options)[0]

    def stream(self, input_ids, attention_mask=None, *, max_new_tokens: int = 20, adapter: str | None = None,
               adapter_names: Sequence[str] | None = None, do_sample: bool = False, temperature: float = 1.0,
               top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
               decoder_start_token_id: int | None = None, eos_token_id: int | Sequence[int] | None = None,
               pad_token_id: int | None = None, use_cache: bool = True) -> Iterator[Step]:
        """Yield one `Step` (tokens [batch], logits [batch, vocab]) per new decoder token, until `max_new_tokens` or
        every row has produced an EOS token. `input_ids` [batch, prompt] int, `attention_mask` 0 on padding (either
        side). `adapter` / `adapter_names` as for `RoadSession.run`. `use_cache=False` reruns decoder_model.onnx
        over all tokens each step (what the cache saves; for checking it). The token ids default to the
        directory's generation config (see the class)."""
        ids, mask = _prompt(input_ids, attention_mask)
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int | np.integer) or max_new_tokens < 1:
            raise RoadError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
        start = self._token("decoder_start_token_id", decoder_start_token_id)
        pad = self._token("pad_token_id", pad_token_id, default=0)
        eos_value = eos_token_id if eos_token_id is not None else self.config.get("eos_token_id")
        eos = np.array([] if eos_value is None else np.atleast_1d(eos_value), dtype=np.int64)
        sampling = Sampling(do_sample, temperature, top_k, top_p)
        rng = np.random.default_rng(seed)
        batch = ids.shape[0]
        states = self.run_encoder(ids, mask, adapter=adapter, adapter_names=adapter_names)
        cached = use_cache and self.decoder_with_past is not None
        steps = self.decoder_with_past if cached and self.decoder_with_past is not None else self.decoder
        decoding = Decoding(host_run(self.decoder, *self._route(self.decoder, batch, adapter, adapter_names)),
                            DecoderCache(mask, states, cached),
                            step_run=host_run(steps, *self._route(steps, batch, adapter, adapter_names)))
        start_ids = np.full((batch, 1), start, dtype=np.int64)
        yield from decode(decoding, start_ids, np.ones_like(start_ids), max_new_tokens=max_new_tokens,
                          pick=host_pick(decoding, sampling, rng), eos=eos, pad_token_id=pad)

    def generate(self, input_ids, attention_mask=None, **options) -> np.ndarray:
        """The decoder's tokens [batch, 1 + new] int64, starting with `decoder_start_token_id`, as transformers'
        `generate` returns them for an encoder-decoder model (options as for `stream`)."""
        start = self._token("decoder_start_token_id", options.get("decoder_start_token_id"))
        new = [step.tokens[:, None] for step in self.stream(input_ids, attention_mask, **options)]
        batch = new[0].shape[0]
        return np.concatenate([np.full((batch, 1), start, dtype=np.int64), *new], 1)

    def _token(self, key: str, given, default=None) -> int:
        value = given if given is not None else self.config.get(key, default)
        if isinstance(value, list | tuple):
            value = value[0] if value else None
        if value is None or isinstance(value, bool) or not isinstance(value, int | np.integer):
            raise RoadError(f"{self.path}: no {key} in its generation config; pass {key}=")
        return int(value)


class DecoderCache:
    """The decode loop's cache strategy (`road_export.runtime.generation.Decoding`) for an encoder-decoder's decoder:
    the encoder's attention mask is fed to every run and its output (`encoder_hidden_states`) to the first;
    decoder_model.onnx's first run also returns the cross-attention keys/values, which then go unchanged with the
    growing self-attention cache (present.* -> past_key_values.*) to every run of decoder_with_past_model.onnx.
    `cached=False`: every step reruns decoder_model.onnx over all the decoder's tokens (what the cache saves)."""

    aligned = True

    def __init__(self, encoder_mask: np.ndarray, states: np.ndarray, cached: bool):
        self.encoder_mask, self.states, self.cached = encoder_mask, states, cached
        self.past: dict[str, np.ndarray] = {}
        self.tokens = np.zeros((encoder_mask.shape[0], 0), np.int64)

    def prefill(self, ids: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
        self.tokens, self.past = ids, {}
        return {"input_ids": ids, "encoder_attention_mask": self.encoder_mask, "encoder_hidden_states": self.states}

    def step(self, tokens: np.ndarray) -> dict[str, np.ndarray]:
        new = np.asarray(tokens, np.int64)[:, None]
        self.tokens = np.concatenate([self.tokens, new], 1)
        if self.cached:
            return {"input_ids": new, "encoder_attention_mask": self.encoder_mask, **self.past}
        return {"input_ids": self.tokens, "encoder_attention_mask": self.encoder_mask,
                "encoder_hidden_states": self.states}

    def update(self, outputs: Mapping[str, np.ndarray]) -> None:
        if self.cached:  # the first run's cross-attention keys/values stay; the self-attention cache grows
            self.past.update({PAST + n[len(PRESENT):]: v for n, v in outputs.items() if n.startswith(PRESENT)})

    def shared_outputs(self) -> dict[str, np.ndarray]:
        return {}

    def last_logits(self, logits: np.ndarray) -> np.ndarray:
        return logits[:, -1]
