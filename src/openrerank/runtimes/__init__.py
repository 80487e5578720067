"""Runtimes run a family's network on padded features (OpenVINO, ONNX Runtime, PyTorch); selection picks one."""
