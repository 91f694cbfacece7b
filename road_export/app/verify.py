"""`verify` and `verify_seq2seq`: the parity harness's torch references (road_export.app.parity), under the names the
CLI and users call.

`verify(onnx_path, torch_model, ...)` checks one ONNX file against peft's model or road-export's
(road_export.app.parity.torch_reference); `verify_seq2seq(directory, torch_model, ...)` an encoder-decoder export
(road_export.app.parity.seq2seq_reference). Both return a `ParityReport` (road_export.app.parity.report). The cases they
run are planned in road_export.app.parity.cases, the rows judged in road_export.app.parity.comparisons.
"""

from __future__ import annotations

from road_export.app.parity.cases import CACHE_SHAPES, DEFAULT_SHAPES, MIXED_SHAPES, SEQ2SEQ_SHAPES, usable_positions
from road_export.app.parity.comparisons import COSINE_MIN, TOLERANCE, OutputParity, compare
from road_export.app.parity.feeds import cast_feeds, declared_types, round_as_fed
from road_export.app.parity.report import ParityReport
from road_export.app.parity.seq2seq_reference import verify_seq2seq
from road_export.app.parity.torch_reference import verify

__all__ = ["CACHE_SHAPES", "COSINE_MIN", "DEFAULT_SHAPES", "MIXED_SHAPES", "SEQ2SEQ_SHAPES", "TOLERANCE",
           "OutputParity", "ParityReport", "cast_feeds", "compare", "declared_types", "round_as_fed",
           "usable_positions", "verify", "verify_seq2seq"]
