"""MiMSlicer engine: Mask-in-Mask self-supervised pre-training, fine-tuning and inference for 3D CT."""
__version__ = "0.1.0"
