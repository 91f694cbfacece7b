"""Graph passes on onnx-ir and the onnxscript rewriter, torch-free, one concern per module.

fold_constants, fuse, compose, fold (+ freeze_swappable), lower (+ unlower), attention; `pipeline` chains them as an
`ir.passes.Sequential` and `optimize_file` runs them on a file. Each pass returns an `ir.passes.PassResult`
subclass carrying its counts.
"""
