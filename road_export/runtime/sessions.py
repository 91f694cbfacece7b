"""`open_session`: the runtime's one entry point for a path, a single ONNX file or a model directory; torch-free.

It picks the session class for what is at the path: a directory holding an encoder-decoder export
(encoder_model.onnx, decoder_model.onnx, ...) opens as a `road_export.runtime.seq2seq.Seq2SeqSession`, anything else
(an ONNX file, a road-export model directory, an onnxruntime-genai model builder directory) as a
`road_export.runtime.session.RoadSession`. It sits above both, so neither imports the other's caller.
"""

from __future__ import annotations

from pathlib import Path

from road_export.runtime.session import RoadSession
from road_export.runtime.seq2seq import Seq2SeqSession, is_seq2seq_dir

__all__ = ["open_session"]


def open_session(path: str | Path, **options) -> RoadSession | Seq2SeqSession:
    """A `Seq2SeqSession` for an encoder-decoder export directory, else a `RoadSession`; `options` (threads,
    providers, native, session_config, fuse) go to the class. Raises RoadError as the class does (a missing or
    unloadable file, a directory without a model)."""
    if is_seq2seq_dir(path):
        return Seq2SeqSession(path, **options)
    return RoadSession(path, **options)
