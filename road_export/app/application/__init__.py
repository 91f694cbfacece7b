"""The application layer: typed options and the jobs behind road-export's commands, for Python as for the CLI.

    from road_export.app.application import ExportOptions, export_verified

    result = export_verified(ExportOptions("model.onnx", base="./llama", adapters=("./road",), mode="rotate"))
    print(result.summary, result.report.table())

A job checks every option and path first (`check`, before anything is loaded), then runs load -> export -> verify
-> report -> commit: every file it writes (model, `.data`, swap files, report, model directory) is written under
one `files.kept_on_failure`, whose end is the commit (new files in place, old ones dropped); a failure or an
interruption before it leaves the targets as they were. Progress is a callback (`on_step(name)`); SIGINT/SIGTERM
while a job runs are `Interruptions`, owned by the job (or by the caller that installed one, as the CLI does for its
whole command, so that its printing after the commit is covered too). The CLI (road_export.app.cli) parses, maps its
arguments to these options and presents the result; the error kinds and their exit codes are road_export.core.errors'.

Messages name the command line's options (`--report`, `--atol`), the same for Python users: each option is the
`ExportOptions` field of the same name.

The package is split by concern: `interruptions` (signals, steps, our own failures), `checks` (what the jobs share),
`export_job`, `verify_job` and `commands` (attach, optimize, adapter, merge-checkpoint, kernels).
"""

from __future__ import annotations

from road_export.app.application.commands import (
    AttachOptions,
    OptimizeOptions,
    attach_adapters,
    convert_adapter,
    merge_checkpoint,
    optimize,
    register_kernels,
)
from road_export.app.application.export_job import ExportJob, ExportOptions, VerifiedExport, export_verified
from road_export.app.application.interruptions import Interruptions, Step
from road_export.app.application.verify_job import VerifyOptions, verify_model

__all__ = ["AttachOptions", "ExportJob", "ExportOptions", "Interruptions", "OptimizeOptions", "Step", "VerifiedExport",
           "VerifyOptions", "attach_adapters", "convert_adapter", "export_verified", "merge_checkpoint", "optimize",
           "register_kernels", "verify_model"]
