"""Typed fine-tuning configuration. A preset has two halves: the encoder comes from the pre-trained checkpoint when
there is one, else from the pre-training preset that `configs/finetune/<preset>.yaml` names as `encoder_preset`
(by default the one of the same name, `configs/<preset>.yaml`); everything else comes from the fine-tuning preset.
Saved with every run and inside model.pt; frozen after loading."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from engine.config.schema import (
    PRESET_DIR,
    build_dataclass,
    check_choice,
    load_config_file,
    load_preset,
    load_yaml,
    merge_trees,
    to_plain,
    undot,
)
from engine.config.sections import DataConfig, EncoderConfig, TrainConfig
from engine.errors import UserError

FINETUNE_PRESET_DIR = PRESET_DIR / "finetune"
DEFAULT_PRESET = "fast"  # `finetune` without --preset: the recipe measured to learn fastest on a CPU (see its YAML)
TASKS = ("segmentation", "classification")
BACKBONES = ("hybrid", "swinunetr")
DECODERS = ("unetr", "light")  # the hybrid's full-resolution level: UNETR's residual blocks, or one thin convolution


@dataclass(frozen=True)
class ModelConfig:
    """The network around the encoder: `hybrid` (our encoder + UNETR decoder) or MONAI `swinunetr`."""

    backbone: str = "hybrid"
    roi: int = 96  # side of the sliding window and of the training crops, in voxels at data.spacing
    feature_size: int = 48  # UNETR decoder width (SwinUNETR: also its embedding width)
    decoder: str = "unetr"  # hybrid: "light" thins the full-resolution level to one convolution a side
    head_dropout: float = 0.0  # classification head

    def validate(self, patch_size: int) -> None:
        check_choice("model.backbone", self.backbone, BACKBONES)
        check_choice("model.decoder", self.decoder, DECODERS)
        if self.backbone == "hybrid" and (self.roi % patch_size or self.roi < 2 * patch_size):
            raise UserError(f"model.roi={self.roi} must be a multiple of the encoder's patch size {patch_size}, and at "
                            f"least two of them (the decoder normalises the token grid: one token is too few)")
        if self.backbone == "swinunetr":
            if self.roi % 32 or self.roi < 64:
                raise UserError(f"SwinUNETR needs model.roi divisible by 32 and at least 64, got {self.roi} "
                                "(e.g. --set model.roi=64)")
            if self.feature_size % 12:
                raise UserError(f"SwinUNETR needs model.feature_size divisible by 12, got {self.feature_size}")
        if self.feature_size < 1:
            raise UserError(f"model.feature_size must be positive, got {self.feature_size}")


@dataclass(frozen=True)
class CropConfig:
    """Random training crops of side model.roi, centred on foreground with probability pos / (pos + neg)."""

    samples: int = 2  # crops per volume per step
    pos: float = 1.0
    neg: float = 1.0
    # voxels of air (-1000 HU) added on every side of a training case after its body crop: where a scan's field of
    # view hugs the body, crops still see the body's edge against air, and background centres fall in that air
    air_margin: int = 0

    def validate(self) -> None:
        if self.samples < 1 or self.pos < 0 or self.neg < 0 or self.pos + self.neg == 0 or self.air_margin < 0:
            raise UserError(f"crop needs samples >= 1, pos, neg >= 0 (not both 0) and air_margin >= 0, got {self}")


@dataclass(frozen=True)
class AugmentConfig:
    """Light augmentation: a flip per axis of `flip_axes`, a 90-degree rotation in the plane of `rotate90_axes`, an
    intensity scale/shift. Axes are those of the model grid, which is RAS: 0 runs right-left, 1 back-front, 2
    feet-head. Flipping axis 0, or rotating in a plane that holds it, turns a right lung into a left one, so the
    defaults leave axis 0 alone: a structure with a side keeps it."""

    flip: float = 0.2  # probability of a flip, per axis of flip_axes
    flip_axes: tuple[int, ...] = (1, 2)
    rotate90: float = 0.2
    rotate90_axes: tuple[int, ...] = (1, 2)
    intensity: float = 0.5
    intensity_amount: float = 0.1  # scale by 1 +- a, shift by +- a (intensities are windowed to [0, 1])

    def validate(self) -> None:
        axes_ok = all(a in (0, 1, 2) for a in self.flip_axes + self.rotate90_axes)
        if not axes_ok or len(set(self.flip_axes)) != len(self.flip_axes):
            raise UserError(f"augment.flip_axes and augment.rotate90_axes take axes 0, 1, 2 (0: right-left), got "
                            f"{list(self.flip_axes)} and {list(self.rotate90_axes)}")
        if len(self.rotate90_axes) != 2 or self.rotate90_axes[0] == self.rotate90_axes[1]:
            raise UserError(f"augment.rotate90_axes names the plane of the rotation: two different axes, got "
                            f"{list(self.rotate90_axes)}")


@dataclass(frozen=True)
class ValidationConfig:
    every: int = 100  # optimiser steps between validations (and always after the last step)
    overlap: float = 0.5  # sliding-window overlap
    sw_batch_size: int = 2

    def validate(self) -> None:
        if self.every < 1 or not 0.0 <= self.overlap < 1.0 or self.sw_batch_size < 1:
            raise UserError(f"val needs every >= 1, 0 <= overlap < 1, sw_batch_size >= 1; got {self}")


@dataclass(frozen=True)
class PretrainedDataConfig:
    """What the pre-trained encoder saw: its pre-training's voxel spacing and HU window (None: not known, or no
    pre-trained weights). By default the run's `data` takes them; recorded here, next to the run's own."""

    spacing: tuple[float, ...] | None = None
    hu_window: tuple[float, ...] | None = None


@dataclass(frozen=True)
class FinetuneConfig:
    task: str = "segmentation"
    preset: str = "base"
    freeze_encoder: bool = False
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    pretrained_data: PretrainedDataConfig = field(default_factory=PretrainedDataConfig)
    crop: CropConfig = field(default_factory=CropConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    val: ValidationConfig = field(default_factory=ValidationConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self) -> "FinetuneConfig":
        check_choice("task", self.task, TASKS)
        self.encoder.validate()
        self.model.validate(self.encoder.patch_size)
        self.crop.validate()
        self.augment.validate()
        self.val.validate()
        self.train.validate()
        if len(self.data.spacing) != 3 or min(self.data.spacing) <= 0:
            raise UserError(f"data.spacing needs 3 positive values in mm, got {self.data.spacing}")
        lo, hi = self.data.hu_window
        if hi <= lo:
            raise UserError(f"data.hu_window must be [low, high] with low < high, got {self.data.hu_window}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return to_plain(dataclasses.asdict(self))


def finetune_presets() -> list[str]:
    return sorted(p.stem for p in FINETUNE_PRESET_DIR.glob("*.yaml"))


def load_finetune_preset(name: str) -> dict[str, Any]:
    if name not in finetune_presets():
        check_choice("preset", name, tuple(finetune_presets()))
    with open(FINETUNE_PRESET_DIR / f"{name}.yaml") as f:
        return load_yaml(f) or {}


def build_finetune_config(preset: str, task: str = "segmentation", encoder: dict | None = None,
                          overrides: dict[str, Any] | None = None) -> FinetuneConfig:
    """Fine-tune preset, the encoder (the checkpoint's if given, else the preset's pre-training preset's), then
    overrides."""
    tree = load_finetune_preset(preset)
    encoder_preset = tree.pop("encoder_preset", preset)
    tree["encoder"] = dict(encoder) if encoder is not None else load_preset(encoder_preset).get("encoder", {})
    tree = merge_trees(tree, undot(overrides or {}))
    tree["task"], tree["preset"] = task, preset
    return finetune_config_from_dict(tree).validate()


def finetune_config_from_file(path, task: str, overrides: dict[str, Any] | None = None) -> FinetuneConfig:
    """A config file (a run's saved config.yaml) with overrides on top; its task must be `task`."""
    tree = load_config_file(path)
    if tree.get("task", task) != task:
        raise UserError(f"--config {path} holds a '{tree['task']}' config; pass --task {tree['task']}")
    tree = merge_trees(tree, undot(overrides or {}))
    tree["task"] = task
    return finetune_config_from_dict(tree).validate()


def config_file_seed(path) -> int:
    """The training seed a config file gives (its train.seed, else 0)."""
    return int((load_config_file(path).get("train") or {}).get("seed", 0))


def finetune_config_from_dict(tree: dict[str, Any]) -> FinetuneConfig:
    return build_dataclass(FinetuneConfig, tree, "")
