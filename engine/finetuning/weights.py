"""Pre-trained weights from three families, loaded into a fine-tuning model with an exact key report.

- `mimslicer`: our pre-training checkpoints (MiM / MAE: `encoder.*`; HybridMIM on the hybrid encoder:
  `backbone.encoder.*`) and our fine-tuned `model.pt` files. The encoder config comes with them.
- `mim-authors`: the MiM authors' `ckpt["model"]` of `MaskedAutoencoderConvViT3d` (keys without prefix:
  `patch_embed1..5`, `blocks1..4`, `stage1..3_output_decode`, `norm`, `pos_embed`, plus MAE-decoder and
  alignment heads), loaded into our encoder's "authors" variant, which computes their encoder's function. Their
  file pickles an argparse Namespace: it is read with torch's weights-only unpickler and an allow-list of exactly
  that class, never with `weights_only=False`. Of it only `model_name` is read (for the head count).
- `swinunetr-ssl`: MONAI's SwinUNETR-SSL `model_swinvit.pt` (`state_dict` with `module.`-prefixed Swin-ViT keys).
  It feeds MONAI's `SwinUNETR` (backbone `swinunetr`), under `swinViT.`; the SSL heads are ignored.

Every load asserts that the missing keys are exactly the model's new (non-encoder) weights and that nothing is
unexpected (METHOD 1.4), after position-embedding interpolation and first-conv channel repeat."""
from __future__ import annotations

import argparse
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from engine.errors import UserError
from engine.runtime.checkpoint import FORMAT

ALLOWED_GLOBALS = [argparse.Namespace]  # the only class the authors' checkpoint pickles besides tensors
# Their builders hard-code the head count (models_convmae3d_v4.py:492-556), which weight shapes cannot tell; their
# args.num_heads is an unused SimMIM option (default the list [3, 6, 12, 24]) and is never read.
AUTHORS_HEADS = {"convmae_convvit_base_patch16": 12, "convmae_convvit_base_patch16_i128": 12,
                 "convmae_convvit_tiny_patch16": 3}
AUTHORS_HEAD_DIM = 32  # the same in every builder of theirs (384 / 12, 96 / 3): the fallback for another model_name
AUTHORS_HU_WINDOW = (-1000.0, 1000.0)  # their a_min / a_max defaults; they scale HU to [0, 1] and do not resample

# the authors' encoder key -> ours (regex over the whole key; \1, \2 are stage / block indices)
AUTHORS_KEY_MAP = [
    (r"patch_embed([1-4])\.proj\.(weight|bias)", lambda m: f"embeds.{int(m[1]) - 1}.proj.{m[2]}"),
    (r"patch_embed([1-4])\.norm\.(weight|bias)", lambda m: f"embeds.{int(m[1]) - 1}.norm.norm.{m[2]}"),
    (r"patch_embed5\.(weight|bias)", lambda m: f"token_proj.{m[1]}"),
    (r"stage([1-3])_output_decode\.(weight|bias)", lambda m: f"stage_proj.{int(m[1]) - 1}.{m[2]}"),
    (r"blocks([1-3])\.(\d+)\.(norm1|norm2)\.(weight|bias)",
     lambda m: f"conv_stages.{int(m[1]) - 1}.{m[2]}.{m[3]}.norm.{m[4]}"),
    (r"blocks([1-3])\.(\d+)\.(conv1|conv2)\.(weight|bias)",
     lambda m: f"conv_stages.{int(m[1]) - 1}.{m[2]}.{m[3]}.{m[4]}"),
    (r"blocks([1-3])\.(\d+)\.attn\.(weight|bias)", lambda m: f"conv_stages.{int(m[1]) - 1}.{m[2]}.dwconv.{m[3]}"),
    (r"blocks([1-3])\.(\d+)\.mlp\.fc1\.(weight|bias)", lambda m: f"conv_stages.{int(m[1]) - 1}.{m[2]}.mlp.0.{m[3]}"),
    (r"blocks([1-3])\.(\d+)\.mlp\.fc2\.(weight|bias)", lambda m: f"conv_stages.{int(m[1]) - 1}.{m[2]}.mlp.3.{m[3]}"),
    (r"blocks4\.(\d+)\.(norm1|norm2|attn\.qkv)\.(weight|bias)", lambda m: f"blocks.{m[1]}.{m[2]}.{m[3]}"),
    (r"blocks4\.(\d+)\.attn\.proj\.(weight|bias)", lambda m: f"blocks.{m[1]}.attn.out_proj.{m[2]}"),
    (r"blocks4\.(\d+)\.mlp\.fc1\.(weight|bias)", lambda m: f"blocks.{m[1]}.mlp.linear1.{m[2]}"),
    (r"blocks4\.(\d+)\.mlp\.fc2\.(weight|bias)", lambda m: f"blocks.{m[1]}.mlp.linear2.{m[2]}"),
    (r"norm\.(weight|bias)", lambda m: f"norm.{m[1]}"),
    (r"pos_embed", lambda m: "pos_embed"),
]
AUTHORS_PRETRAIN_ONLY = ("decoder_", "mask_token", "aggregate_")
SWIN_PRETRAIN_ONLY = ("rotation_", "contrastive_", "conv.", "norm.")


@dataclass
class PretrainedWeights:
    """Source weights already renamed into the model's namespace (`encoder.*` or `swinViT.*`)."""

    family: str
    path: str
    state: dict[str, torch.Tensor]
    backbone: str  # hybrid | swinunetr: which network these weights feed
    encoder: dict | None = None  # encoder config implied by the weights (hybrid)
    feature_size: int | None = None  # SwinUNETR embedding width
    data: dict = field(default_factory=dict)  # what pre-training saw, where known: spacing (mm), hu_window (HU)
    ignored: list[str] = field(default_factory=list)  # pre-training-only keys, deliberately not loaded
    notes: list[str] = field(default_factory=list)
    method: str | None = None  # the pre-training method, where known: mim, mae, hybridmim, swinunetr-ssl

    def describe(self) -> dict:
        """What a model card says of these weights (plain data)."""
        return {"family": self.family, "path": self.path, "method": self.method}


@dataclass
class KeyReport:
    source: str
    family: str
    loaded: list[str]
    missing: list[str]  # model keys left at their initial values: exactly the new (non-encoder) weights
    unexpected: list[str]  # always empty after a successful load
    ignored: list[str]
    notes: list[str]

    def to_dict(self) -> dict:
        return dict(self.__dict__)

    def summary(self) -> str:
        new = [k for k in self.missing if not k.endswith("pos_embed")]  # a fixed embedding is rebuilt, not trained
        lines = [f"pre-trained weights: {self.source} ({self.family})",
                 f"  loaded {len(self.loaded)} encoder tensors",
                 f"  new (trained from scratch) {len(new)}: {_groups(new)}",
                 f"  ignored (pre-training only) {len(self.ignored)}: {_groups(self.ignored)}"]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def _groups(keys: list[str]) -> str:
    counts = Counter(k.split(".")[0] for k in keys)
    return ", ".join(f"{name}.* ({n})" for name, n in sorted(counts.items())) or "none"


def read_weights_file(path: str | Path) -> dict:
    """torch.load with the weights-only unpickler, allowing argparse.Namespace and nothing else."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such weights file")
    try:
        with torch.serialization.safe_globals(ALLOWED_GLOBALS):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # UnpicklingError, RuntimeError, EOFError... for foreign, unsafe or broken files
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"{path}: refused to load (only tensors, plain data and argparse.Namespace are allowed): "
                        f"{first[:300]}") from None
    if not isinstance(obj, dict):
        raise UserError(f"{path}: expected a dict of weights, found {type(obj).__name__}")
    return obj


def read_pretrained(path: str | Path) -> PretrainedWeights:
    """Read a weights file of any supported family and rename its encoder keys into our namespace."""
    obj = read_weights_file(path)
    if obj.get("format") == FORMAT:
        return ours_key_map(obj, str(path))
    state = _state_dict(obj)
    if "patch_embed1.proj.weight" in state:
        return authors_key_map(state, obj.get("args"), str(path))
    if any(_swin_name(k).startswith(("patch_embed.", "layers1.")) for k in state):
        return swin_key_map(state, str(path))
    raise UserError(f"{path}: not a MiMSlicer, MiM-authors or SwinUNETR-SSL checkpoint "
                    f"(first keys: {', '.join(list(state)[:4]) or 'none'})")


def _state_dict(obj: dict) -> dict[str, torch.Tensor]:
    for key in ("model", "state_dict", "net", "network"):
        if isinstance(obj.get(key), dict):
            return obj[key]
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def ours_key_map(ckpt: dict, path: str) -> PretrainedWeights:
    config, state = ckpt.get("config") or {}, ckpt["model"]
    if config.get("method") == "hybridmim" and (config.get("hybridmim") or {}).get("backbone") == "unet":
        raise UserError(f"{path}: a HybridMIM checkpoint on the UNet backbone has no hybrid encoder to fine-tune; "
                        "pre-train with --set hybridmim.backbone=hybrid, or use method mim / mae")
    prefix = next((p for p in ("encoder.", "backbone.encoder.") if any(k.startswith(p) for k in state)), None)
    if prefix is None or "encoder" not in config:
        raise UserError(f"{path}: this {ckpt.get('kind')} checkpoint holds no hybrid encoder weights")
    # our position embedding is the fixed sin-cos, rebuilt for any token grid: not carried over. The authors'
    # variant's came from their checkpoint (a model.pt fine-tuned from it holds it) and travels on.
    keep_pos = config["encoder"].get("variant") == "authors"
    taken = {k for k in state if k.startswith(prefix) and (k != prefix + "pos_embed" or keep_pos)}
    mapped = {"encoder." + k[len(prefix):]: v for k, v in state.items() if k in taken}
    ignored = [k for k in state if k not in taken]
    seen = config.get("data") or {}
    data = {key: [float(v) for v in seen[key]] for key in ("spacing", "hu_window") if seen.get(key) is not None}
    return PretrainedWeights("mimslicer", path, mapped, "hybrid", encoder=dict(config["encoder"]), ignored=ignored,
                             data=data, method=config.get("method") or _pretraining_method(ckpt))


def _pretraining_method(ckpt: dict) -> str | None:
    """A fine-tuned model.pt used as pre-trained weights: the method its own encoder was pre-trained with."""
    return ((ckpt.get("provenance") or {}).get("pretrained") or {}).get("method")


def authors_key_map(state: dict, args, path: str) -> PretrainedWeights:
    """Their encoder keys -> ours; the encoder is our "authors" variant, which computes their function."""
    mapped, ignored = {}, []
    for key, value in state.items():
        ours = _authors_name(key)
        if ours is not None:
            mapped["encoder." + ours] = value
        elif key.startswith(AUTHORS_PRETRAIN_ONLY):
            ignored.append(key)
        else:
            raise UserError(f"{path}: unexpected key '{key}' for a MiM-authors checkpoint (no key map for it)")
    encoder = authors_encoder_config(state, args)
    window = [float(getattr(args, "a_min", AUTHORS_HU_WINDOW[0])), float(getattr(args, "a_max", AUTHORS_HU_WINDOW[1]))]
    notes = [(f"encoder variant 'authors' (their function: GELU-ended patch embeddings, patch_embed5 as token_proj, "
              f"ViT LayerNorm eps 1e-6), {encoder['num_heads']} heads"),
             f"their pre-training windowed HU to {window} (a_min, a_max) and did not resample the volumes: "
             "data.hu_window defaults to theirs, data.spacing stays the preset's"]
    return PretrainedWeights("mim-authors", path, mapped, "hybrid", encoder=encoder, ignored=ignored, notes=notes,
                             data={"hu_window": window}, method="mim")


def _authors_name(key: str) -> str | None:
    for pattern, rename in AUTHORS_KEY_MAP:
        match = re.fullmatch(pattern, key)
        if match:
            return rename(match)
    return None


def authors_encoder_config(state: dict, args) -> dict:
    """Dims, strides, depths, kernel and MLP ratio from the weight shapes; heads from their model name."""
    embeds = [state[f"patch_embed{i}.proj.weight"] for i in range(1, 5)]
    dims = [int(w.shape[0]) for w in embeds]
    depths = [len({k.split(".")[1] for k in state if k.startswith(f"blocks{s}.")}) for s in range(1, 5)]
    ratios = {round(state[f"blocks{s}.0.mlp.fc1.weight"].shape[0] / dims[s - 1], 4)
              for s in range(1, 5) if depths[s - 1]}
    if len(ratios) != 1:
        raise UserError(f"MiM-authors checkpoint: MLP ratios differ between stages ({sorted(ratios)}); ours share one")
    return {"in_channels": int(embeds[0].shape[1]), "dims": dims, "depths": depths,
            "strides": [int(w.shape[2]) for w in embeds], "num_heads": authors_heads(dims[3], args),
            "mlp_ratio": float(ratios.pop()), "conv_kernel": int(state["blocks1.0.attn.weight"].shape[-1]),
            "dropout": 0.0, "variant": "authors"}


def authors_heads(width: int, args) -> int:
    """Their builder's head count for `args.model_name`, else width / 32 (their head size in every builder)."""
    name = getattr(args, "model_name", None)
    heads = AUTHORS_HEADS.get(name) if isinstance(name, str) else None
    if heads is None:
        heads = width // AUTHORS_HEAD_DIM if width % AUTHORS_HEAD_DIM == 0 else None
    if heads is None or heads < 1 or width % heads:
        raise UserError(f"MiM-authors checkpoint: cannot tell the number of attention heads for model "
                        f"'{name}' of width {width} (known models: {', '.join(AUTHORS_HEADS)}; others need a width "
                        f"divisible by {AUTHORS_HEAD_DIM})")
    return heads


def _swin_name(key: str) -> str:
    for prefix in ("module.", "swinViT.", "swin_vit."):
        if key.startswith(prefix):
            key = key[len(prefix):]
    return key.replace(".mlp.fc1.", ".mlp.linear1.").replace(".mlp.fc2.", ".mlp.linear2.")


def swin_key_map(state: dict, path: str) -> PretrainedWeights:
    mapped, ignored = {}, []
    for key, value in state.items():
        name = _swin_name(key)
        if name.startswith(("patch_embed.", "layers1.", "layers2.", "layers3.", "layers4.")):
            mapped["swinViT." + name] = value
        elif name.startswith(SWIN_PRETRAIN_ONLY):
            ignored.append(key)
        else:
            raise UserError(f"{path}: unexpected key '{key}' for a SwinUNETR-SSL checkpoint")
    width = int(mapped["swinViT.patch_embed.proj.weight"].shape[0])
    return PretrainedWeights("swinunetr-ssl", path, mapped, "swinunetr", feature_size=width, ignored=ignored,
                             method="swinunetr-ssl")


def load_pretrained(model: nn.Module, weights: PretrainedWeights) -> KeyReport:
    """Load `weights` into `model`'s encoder; raise a UserError unless the key report is exactly as expected."""
    prefix = model.encoder_prefix
    target = model.state_dict()
    state = adapt_shapes(dict(weights.state), target, prefix)
    wrong = [k for k in state if k in target and state[k].shape != target[k].shape]
    if wrong:
        k = wrong[0]
        raise UserError(f"{weights.path}: '{k}' is {list(state[k].shape)} in the checkpoint but "
                        f"{list(target[k].shape)} in the model ({len(wrong)} such); the encoder settings differ from the checkpoint's")
    result = model.load_state_dict(state, strict=False)
    expected_missing = {k for k in target if not k.startswith(prefix)}
    if prefix + "pos_embed" in target and prefix + "pos_embed" not in state:
        expected_missing.add(prefix + "pos_embed")  # our fixed sin-cos, rebuilt for the fine-tuning grid
    _assert_exact(weights.path, set(result.missing_keys), expected_missing, result.unexpected_keys)
    loaded = sorted(k for k in state if k in target)
    notes = list(weights.notes)
    if prefix + "pos_embed" in expected_missing:
        notes.append("position embedding: fixed 3D sin-cos built for the fine-tuning token grid")
    return KeyReport(weights.path, weights.family, loaded, sorted(result.missing_keys), [],
                     sorted(weights.ignored), notes)


def _assert_exact(path: str, missing: set[str], expected: set[str], unexpected: list[str]) -> None:
    if unexpected:
        raise UserError(f"{path}: {len(unexpected)} encoder weight(s) have no place in the model, first: "
                        f"{sorted(unexpected)[0]}; the encoder settings differ from the checkpoint's")
    lacking = sorted(missing - expected)
    if lacking:
        raise UserError(f"{path}: the checkpoint lacks {len(lacking)} encoder weight(s), first: {lacking[0]}")
    if missing != expected:  # a new-head key was overwritten: the source holds non-encoder keys
        raise UserError(f"{path}: loaded weights outside the encoder: {sorted(expected - missing)[:3]}")


def adapt_shapes(state: dict, target: dict, prefix: str) -> dict:
    """Interpolate a position embedding to the model's token grid; repeat a 1-channel first conv over channels."""
    pos = prefix + "pos_embed"
    if pos in state and pos in target and state[pos].shape != target[pos].shape:
        state[pos] = interpolate_pos_embed(state[pos], target[pos].shape[1])
    for first in (prefix + "embeds.0.proj.weight", prefix + "patch_embed.proj.weight"):
        if first in state and first in target and state[first].shape[1] != target[first].shape[1]:
            state[first] = repeat_first_conv(state[first], target[first].shape[1])
    return state


def interpolate_pos_embed(pos: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """[1, g^3, C] -> [1, n_tokens, C] by trilinear interpolation on the cubic token grid."""
    g_old, g_new = round(pos.shape[1] ** (1 / 3)), round(n_tokens ** (1 / 3))
    if g_old**3 != pos.shape[1] or g_new**3 != n_tokens:
        raise UserError(f"position embedding: {pos.shape[1]} -> {n_tokens} tokens is not a cubic grid change")
    grid = pos.reshape(1, g_old, g_old, g_old, -1).permute(0, 4, 1, 2, 3).float()  # [1, C, g, g, g]
    grid = F.interpolate(grid, size=(g_new,) * 3, mode="trilinear", align_corners=False)
    return grid.permute(0, 2, 3, 4, 1).reshape(1, n_tokens, -1).to(pos.dtype)


def repeat_first_conv(weight: torch.Tensor, channels: int) -> torch.Tensor:
    """[O, 1, k, k, k] -> [O, channels, k, k, k], scaled by 1/channels (same response to a repeated input)."""
    if weight.shape[1] != 1:
        raise UserError(f"first conv has {weight.shape[1]} input channels; only a 1-channel conv expands to {channels}")
    return weight.repeat(1, channels, 1, 1, 1) / channels


def freeze(model: nn.Module) -> None:
    """--freeze-encoder: only the new head trains."""
    for name, p in model.named_parameters():
        if name.startswith(model.encoder_prefix):
            p.requires_grad_(False)
