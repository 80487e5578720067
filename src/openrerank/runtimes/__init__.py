"""Runtimes run a family's network on padded features (OpenVINO, ONNX Runtime, PyTorch); selection plans
them, choosing builds the one that serves."""
