"""Inference backends: one interface (`Backend.score`), several engines (PyTorch, ONNX Runtime)."""
