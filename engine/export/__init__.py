"""Exports of a fine-tuned model: a MONAI bundle."""
