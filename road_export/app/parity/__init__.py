"""The parity harness: does an exported file compute what its reference computes? (layer 5)

- `cases`: which inputs run (shapes, the vocabulary sweep, the long sequence, what a builder graph can take)
- references: `torch_reference.verify` (peft's model or road-export's, one file), `seq2seq_reference.verify_seq2seq`
  (an encoder-decoder export), `file_reference.verify_against_file` (another ONNX file, torch-free),
  `crossing` (greedy generation across the lengths where a decoder changes, against transformers' generate)
- `comparisons`: one output against its reference (max abs <= atol, cosine for a quantized file, per-token cosine)
- `report`: the rows of one file as a table and as JSON
- `adapter_checks`, `feeds`, `memory`: the adapter records and coefficients, feeds in the file's declared types,
  the reference's weights lent to onnxruntime.
A file's dtype, metadata and quantization come from `road_export.graph.inspection.read_facts`, as everywhere else.

Importing this package (and `comparisons`, `report`, `cases`, `feeds`, `file_reference`) does not import torch:
`road-export verify --against` runs on a serving host. The torch references import it.
"""

from __future__ import annotations

from road_export.app.parity.cases import LONG_CAP, SWEEP_BUDGET, SWEEP_CHUNK, SWEEP_ROW
from road_export.app.parity.comparisons import (BUDGET_FACTOR, COSINE_MIN, TOKEN_COSINE_MIN, TOLERANCE, OutputParity,
                                            compare, merge_rows, min_cosine, skipped_row)
from road_export.app.parity.report import ParityReport

__all__ = ["BUDGET_FACTOR", "COSINE_MIN", "LONG_CAP", "SWEEP_BUDGET", "SWEEP_CHUNK", "SWEEP_ROW", "TOKEN_COSINE_MIN",
           "TOLERANCE", "OutputParity", "ParityReport", "compare", "merge_rows", "min_cosine", "skipped_row"]
