"""Exports of a fine-tuned model: a MONAI bundle, or the network as ONNX."""
