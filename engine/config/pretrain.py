"""Typed configuration: dataclasses, YAML presets, overrides. A resolved config is saved with every run and
inside every checkpoint, and is never mutated after loading (all dataclasses are frozen)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from engine.config.schema import (
    build_dataclass,
    check_choice,
    load_config_file,
    load_preset,
    merge_trees,
    to_plain,
    undot,
)
from engine.config.sections import DataConfig, DecoderConfig, EncoderConfig, TrainConfig
from engine.errors import UserError

METHODS = ("mim", "mae", "hybridmim")
HYBRIDMIM_PATCH = 16  # the HybridMIM authors' masking patch; a region is 2x2x2 of them


@dataclass(frozen=True)
class MaskConfig:
    """MiM levels. roi is R, the network's input side; a MiM sample is one crop of side 2R."""

    roi: int = 96
    levels: int = 3  # 1 = MAE, 2 = coarse+middle, 3 = coarse+middle+fine
    ratios: tuple[float, ...] = (0.5, 0.6, 0.5)  # coarse (of its 2x2x2 blocks), middle, fine
    k2: int = 4  # middle views per coarse view, chosen among the masked coarse blocks
    k3: int = 4  # fine views per middle view, chosen among its masked patches

    def passes_per_sample(self) -> int:
        counts = [1, self.k2, self.k2 * self.k3][: self.levels]
        return sum(counts) if self.levels > 1 else 1

    def validate(self, patch_size: int) -> None:
        if self.roi % patch_size:
            raise UserError(f"roi={self.roi} must be a multiple of the patch size {patch_size}")
        grid = self.roi // patch_size
        if grid < 2:
            raise UserError(f"roi={self.roi} is one patch of {patch_size}: masking needs at least 2 patches per side")
        if self.levels not in (1, 2, 3):
            raise UserError(f"levels must be 1, 2 or 3, got {self.levels}")
        if len(self.ratios) < max(self.levels, 2):
            raise UserError(f"ratios needs one value per level, got {self.ratios}")
        if any(not 0.0 < r < 1.0 for r in self.ratios):
            raise UserError(f"mask ratios must lie strictly between 0 and 1, got {self.ratios}")
        if self.levels >= 2:
            if grid % 2:
                raise UserError(f"the coarse level splits the token grid into 2x2x2 blocks: roi/patch={grid} must be even")
            n_coarse = masked_count(8, self.ratios[0])
            if not 1 <= self.k2 <= n_coarse:
                raise UserError(f"k2={self.k2} middle views must come from the {n_coarse} masked coarse blocks")
        if self.levels == 3:
            n_mid = masked_count(grid**3, self.ratios[1])
            if not 1 <= self.k3 <= n_mid:
                raise UserError(f"k3={self.k3} fine views must come from the {n_mid} masked middle patches")


@dataclass(frozen=True)
class LossConfig:
    rec_weights: tuple[float, ...] = (1.0, 1.0, 1.0)
    norm_pix: bool = True
    align: str = "byol"  # byol | ce | none (see MiMPretrainer: child vs its parent block's centred target)
    align_weight: float = 0.1
    align_dim: int = 256  # output width of the alignment projector and predictor
    ce_temperature: float = 0.2
    curriculum: str = "concurrent"  # concurrent | coarse_to_fine | fine_to_coarse

    def validate(self) -> None:
        check_choice("loss.align", self.align, ("byol", "ce", "none"))
        check_choice("loss.curriculum", self.curriculum, ("concurrent", "coarse_to_fine", "fine_to_coarse"))


@dataclass(frozen=True)
class HybridMIMConfig:
    backbone: str = "unet"  # unet | hybrid
    mask_ratio: float = 0.4
    unet_features: tuple[int, ...] = (32, 64, 128, 256, 512, 32)
    partial: bool = True  # decode only the central box (voxels [R/3, R)^3 as in the authors' code)
    dropout: float = 0.1
    temperature: float = 0.5
    weights: tuple[float, ...] = (1.0, 0.1, 0.1, 0.01, 0.1)  # rec, count, position, consistency, contrast

    def validate(self) -> None:
        check_choice("hybridmim.backbone", self.backbone, ("unet", "hybrid"))
        if len(self.unet_features) != 6:
            raise UserError(f"hybridmim.unet_features needs 6 entries (MONAI BasicUNet), got {self.unet_features}")
        if not 0.0 < self.mask_ratio < 1.0:
            raise UserError(f"hybridmim.mask_ratio must lie strictly between 0 and 1, got {self.mask_ratio}")

    def validate_run(self, roi: int, batch_size: int, patch_size: int) -> None:
        """What a HybridMIM run needs of the other sections: its ROI, batch and (hybrid backbone) encoder patch."""
        region = 2 * HYBRIDMIM_PATCH
        if roi < region or roi % region:
            raise UserError(f"HybridMIM needs mask.roi divisible by {region} (its regions are 2x2x2 masking patches "
                            f"of {HYBRIDMIM_PATCH}), got {roi} (e.g. --set mask.roi={max(region, roi // region * region)})")
        if batch_size < 2:
            raise UserError(f"HybridMIM needs data.batch_size >= 2: its contrastive term takes the batch's other crops "
                            f"as negatives, and with {batch_size} it and its gradient are exactly 0")
        if self.backbone == "hybrid" and patch_size != HYBRIDMIM_PATCH:
            raise UserError(f"HybridMIM on the hybrid encoder needs a patch of {HYBRIDMIM_PATCH} (encoder strides whose "
                            f"product is {HYBRIDMIM_PATCH}), got {patch_size}")


@dataclass(frozen=True)
class PretrainConfig:
    method: str = "mim"
    preset: str = "base"
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    hybridmim: HybridMIMConfig = field(default_factory=HybridMIMConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self) -> "PretrainConfig":
        check_choice("method", self.method, METHODS)
        self.encoder.validate()
        self.decoder.validate()
        if self.method != "hybridmim":
            self.mask.validate(self.encoder.patch_size)
        self.loss.validate()
        self.hybridmim.validate()
        if self.method == "hybridmim":
            self.hybridmim.validate_run(self.mask.roi, self.data.batch_size, self.encoder.patch_size)
        self.train.validate()
        if self.method == "mae" and self.mask.levels != 1:
            raise UserError("method 'mae' is one level; use method 'mim' for several levels")
        return self

    @property
    def crop_size(self) -> int:
        """Side of the random crop one sample is drawn from: 2R for MiM (levels > 1), R otherwise."""
        return self.mask.roi * (2 if self.method == "mim" and self.mask.levels > 1 else 1)

    def to_dict(self) -> dict[str, Any]:
        return to_plain(dataclasses.asdict(self))


def replace_encoder(cfg: EncoderConfig, **changes) -> EncoderConfig:
    return dataclasses.replace(cfg, **changes)


def masked_count(n: int, ratio: float) -> int:
    """Exactly how many of n units a ratio masks: round(n * ratio), at least 1 and at most n - 1."""
    return min(max(int(round(n * ratio)), 1), n - 1)


def build_config(preset: str, method: str = "mim", overrides: dict[str, Any] | None = None) -> PretrainConfig:
    """Preset YAML, then the method's own section of it, then explicit overrides (dotted keys allowed)."""
    tree = load_preset(preset)
    method_sections = tree.pop("methods", {}) or {}
    tree = merge_trees(tree, method_sections.get(method, {}))
    tree = merge_trees(tree, undot(overrides or {}))
    tree["method"], tree["preset"] = method, preset
    return config_from_dict(tree).validate()


def config_from_file(path, overrides: dict[str, Any] | None = None) -> PretrainConfig:
    """A config file (a run's saved config.yaml: method, preset and every setting) with overrides on top."""
    tree = merge_trees(load_config_file(path), undot(overrides or {}))
    return config_from_dict(tree).validate()


def config_from_dict(tree: dict[str, Any]) -> PretrainConfig:
    return build_dataclass(PretrainConfig, tree, "")


