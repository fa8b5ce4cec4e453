"""Host side of the bundle: PyTorch -> ONNX (fp32, fp16, int8), parity checks, manifest."""
