"""Deployment without itnet: ONNX (``onnx_export``), MLIR through torch-mlir (``mlir``) and a self-contained Triton
bundle (``triton_bundle``). Each works from the planned IR, which stays the single source of truth."""
