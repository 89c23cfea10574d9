"""Typed configuration: dataclasses, YAML presets, overrides. A resolved config is saved with every run and
inside every checkpoint, and is never mutated after loading (all dataclasses are frozen)."""
from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from engine.errors import UserError

PRESET_DIR = Path(__file__).parent / "configs"
METHODS = ("mim", "mae", "hybridmim")


@dataclass(frozen=True)
class EncoderConfig:
    """Hybrid ConvMAE-style 3D encoder: three conv stages, then a ViT on the token grid."""

    in_channels: int = 1
    dims: tuple[int, ...] = (48, 96, 192, 384)
    depths: tuple[int, ...] = (2, 2, 2, 11)
    strides: tuple[int, ...] = (2, 2, 2, 2)  # patch side = product of the strides
    num_heads: int = 6
    mlp_ratio: float = 4.0
    conv_kernel: int = 5
    dropout: float = 0.0

    @property
    def patch_size(self) -> int:
        return math.prod(self.strides)

    def validate(self) -> None:
        if not (len(self.dims) == len(self.depths) == len(self.strides) == 4):
            raise UserError(f"encoder dims/depths/strides need 4 entries each, got {self.dims}, {self.depths}, {self.strides}")
        if self.dims[3] % self.num_heads:
            raise UserError(f"encoder dims[3]={self.dims[3]} must be divisible by num_heads={self.num_heads}")
        if self.dims[3] % 6:
            raise UserError(f"encoder dims[3]={self.dims[3]} must be divisible by 6 (3D sin-cos position embedding)")


@dataclass(frozen=True)
class DecoderConfig:
    """MAE transformer decoder shared by all levels."""

    dim: int = 576
    depth: int = 8
    num_heads: int = 16

    def validate(self) -> None:
        if self.dim % self.num_heads or self.dim % 6:
            raise UserError(f"decoder dim={self.dim} must be divisible by num_heads={self.num_heads} and by 6")


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
    align: str = "byol"  # byol | ce | none
    align_weight: float = 0.1
    align_dim: int = 256
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


@dataclass(frozen=True)
class DataConfig:
    spacing: tuple[float, ...] = (1.5, 1.5, 1.5)
    hu_window: tuple[float, ...] = (-1000.0, 1000.0)
    cache_dir: str | None = None
    workers: int = 0
    batch_size: int = 1  # crops per step


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000
    lr: float = 1.5e-4
    min_lr: float = 1e-6
    weight_decay: float = 0.05
    warmup_steps: int = 50
    accumulate: int = 1
    clip_grad: float = 3.0
    amp: str = "auto"  # auto | bf16 | fp16 | off
    checkpoint_every: int = 100
    log_every: int = 1
    seed: int = 0
    # MiM/MAE in one process (DDP runs a step as one pass): at most this many views of a level per forward and
    # backward, 0 = a level's views at once. Same gradients; fewer activations alive at a time. "auto": 1 on a
    # CPU (the fastest there, and the smallest: MiM base 57 s and 3.7 GB per step against 122 s and 18 GB for
    # whole levels, measured on 2 cores), a whole level on a GPU
    views_per_pass: int | str = "auto"

    def validate(self) -> None:
        check_choice("train.amp", self.amp, ("auto", "bf16", "fp16", "off"))
        if self.steps < 1 or self.accumulate < 1 or self.checkpoint_every < 1:
            raise UserError("train.steps, train.accumulate and train.checkpoint_every must be >= 1")
        if self.views_per_pass != "auto" and not (isinstance(self.views_per_pass, int) and self.views_per_pass >= 0):
            raise UserError(f"train.views_per_pass must be 'auto' or an integer >= 0 (0: all views of a level in one "
                            f"pass), got {self.views_per_pass!r}")

    def views_per_pass_on(self, device: torch.device) -> int:
        if self.views_per_pass == "auto":
            return 0 if device.type == "cuda" else 1
        return self.views_per_pass


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


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        hint = difflib.get_close_matches(str(value), choices, n=1)
        suggestion = f" Did you mean '{hint[0]}'?" if hint else ""
        raise UserError(f"unknown {name} '{value}'; choose one of {', '.join(choices)}.{suggestion}")


def masked_count(n: int, ratio: float) -> int:
    """Exactly how many of n units a ratio masks: round(n * ratio), at least 1 and at most n - 1."""
    return min(max(int(round(n * ratio)), 1), n - 1)


def available_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def load_preset(name: str) -> dict[str, Any]:
    presets = available_presets()
    if name not in presets:
        check_choice("preset", name, tuple(presets))
    with open(PRESET_DIR / f"{name}.yaml") as f:
        return yaml.safe_load(f) or {}


def build_config(preset: str, method: str = "mim", overrides: dict[str, Any] | None = None) -> PretrainConfig:
    """Preset YAML, then the method's own section of it, then explicit overrides (dotted keys allowed)."""
    tree = load_preset(preset)
    method_sections = tree.pop("methods", {}) or {}
    tree = merge_trees(tree, method_sections.get(method, {}))
    tree = merge_trees(tree, undot(overrides or {}))
    tree["method"], tree["preset"] = method, preset
    return config_from_dict(tree).validate()


def config_from_dict(tree: dict[str, Any]) -> PretrainConfig:
    return build_dataclass(PretrainConfig, tree, "")


def build_dataclass(cls, tree: dict[str, Any], where: str):
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in tree if k not in fields]
    if unknown:
        hint = difflib.get_close_matches(unknown[0], list(fields), n=1)
        suggestion = f" Did you mean '{where}{hint[0]}'?" if hint else ""
        raise UserError(f"unknown setting '{where}{unknown[0]}'.{suggestion}")
    kwargs = {}
    for name, value in tree.items():
        default = fields[name].default_factory() if fields[name].default_factory is not dataclasses.MISSING else None
        if dataclasses.is_dataclass(default):
            kwargs[name] = build_dataclass(type(default), value or {}, f"{where}{name}.")
        elif isinstance(value, list):
            kwargs[name] = tuple(value)
        else:
            kwargs[name] = value
    return cls(**kwargs)


def merge_trees(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = merge_trees(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def undot(flat: dict[str, Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for key, value in flat.items():
        node = tree
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def to_plain(value):
    if isinstance(value, dict):
        return {k: to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    return value
