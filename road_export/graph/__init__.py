"""Layer 2, the ONNX side without torch: ops, I/O names, file I/O, checks, adapter and swap files, inspection, model
directories, quantization, the road ops' kernel library (native/) and the one onnxruntime session set-up."""
