"""The MiM authors' checkpoint format, as data, for tests (github.com/JiaxinZhuang/MiM, HEAD 7913038; nothing of
theirs is imported or downloaded).

- `authors_namespace()` / `authors_pretrain_namespace()`: the argparse Namespace their `main_pretrain.py` pickles as
  `ckpt["args"]`: `Pretrain/utils/default_arguments.py`'s 103 defaults (checked against their parser: same names,
  order, values and types), then their pretrain.sh flags and what the run sets. argparse does not pass a non-string
  default through `type=`, so `num_heads` is the LIST [3, 6, 12, 24] (an unused SimMIM option), `a_min` an int.
- `authors_checkpoint()`: the dict their `utils/misc.py:save_model` writes (model, optimizer, epoch, scaler, args).
- `authors_state_shapes()` / `authors_state_dict()`: every key of `MaskedAutoencoderConvViT3d.state_dict()`
  (models_convmae3d_v4.py) with its shape, in registration order (checked against their module).
- `authors_encoder_reference()`: their `forward_encoder` with every token kept, re-written in plain torch from
  models_convmae3d_v4.py:230-266 and vision_transformer.py:59-214, to hold our "authors" encoder variant to.
"""
from __future__ import annotations

import argparse
import copy

import torch
import torch.nn.functional as F

# name -> default, in their parser's declaration order (default_arguments.py line of each add_argument in comments)
DEFAULTS: dict = {
    "tags": None,                          # l.11  nargs="+", type=int
    "batch_size": 16,                      # l.13  int (per GPU)
    "epochs": 400,                         # l.15  int
    "accum_iter": 1,                       # l.16  int
    "model_name": "mae_vit_large_patch16",  # l.20  str
    "input_size": 224,                     # l.23  int
    "mask_ratio": 0.75,                    # l.26  float (unused by MiM: it uses mask_ratio_up/mid/down)
    "norm_pix_loss": False,                # l.29/31 store_true
    "weight_decay": 0.05,                  # l.34  float
    "lr": 1e-2,                            # l.37  float; overwritten at run time (main_pretrain.py:90)
    "blr": 1e-3,                           # l.39  float
    "min_lr": 0.0,                         # l.41  float
    "warmup_epochs": 40,                   # l.44  int
    "dataset_split": "1k",                 # l.48  str, choices 1k,+2k,+4k,+10k,+20k,+100k,+110k
    "json_dir": "/data/CT/data/jsons",     # l.51  str
    "yaml_path": "./configs/datasets.yaml",  # l.53  str
    "data_path": "/dev/shm/data",          # l.55  str
    "cache_dir": "/data/tmp/",             # l.57  str
    "logdir": None,                        # l.65  (no type)
    "device": "cuda",                      # l.67
    "seed": 0,                             # l.69  int
    "resume": "",                          # l.70
    "start_epoch": 0,                      # l.73  int
    "num_workers": 4,                      # l.75  int
    "pin_mem": True,                       # l.76-79 store_true / --no_pin_mem store_false; set_defaults True
    "world_size": 1,                       # l.82  int
    "local_rank": -1,                      # l.84  "--local-rank" -> dest local_rank
    "dist_on_itp": False,                  # l.85  store_true
    "dist_url": "env://",                  # l.86
    "a_min": -1000,                        # l.89  type=float but default int -> int
    "a_max": 1000,                         # l.91  int (same reason)
    "b_min": 0.0,                          # l.93  float
    "b_max": 1.0,                          # l.95  float
    "cache_dataset": False,                # l.98  store_true
    "persistent_dataset": False,           # l.99  store_true
    "sw_batch_size": 4,                    # l.100 int
    "roi_x": 96,                           # l.102 int
    "roi_y": 96,                           # l.103 int
    "roi_z": 96,                           # l.104 int (MiM.forward uses roi_z for the coarse resize, v4:369)
    "eval": False,                         # l.106 store_true
    "save_fq": 5,                          # l.108 int
    "dataset_loader": "get_loader",        # l.110 str
    "decoder_embed_dim": 576,              # l.114 int (not read by the MiM model: its builder hard-codes 576)
    "normalize": False,                    # l.116 store_true
    "sr_ratio": 1,                         # l.118 int (1 = plain attention in blocks4)
    "crop_x": 192,                         # l.121 int (96*2)
    "crop_y": 192,                         # l.122
    "crop_z": 192,                         # l.123
    "up_roi_x": 96,                        # l.124
    "up_roi_y": 96,                        # l.125
    "up_roi_z": 96,                        # l.126
    "down_roi_x": 96,                      # l.127
    "down_roi_y": 96,                      # l.128
    "down_roi_z": 96,                      # l.129
    "mask_ratio_up": 0.5,                  # l.130 float
    "mask_ratio_mid": 0.6,                 # l.132 float
    "mask_ratio_down": 0.5,                # l.134 float
    "sample_usual": 4,                     # l.137 int
    "sample_down": 4,                      # l.138 int
    "not_use_attn": False,                 # l.140 store_true
    "moco_dim": 128,                       # l.146 "--moco-dim"
    "moco_k": 65536,                       # l.147 "--moco-k"
    "moco_m": 0.999,                       # l.148 "--moco-m"
    "moco_t": 0.07,                        # l.149 "--moco-t"
    "mlp": False,                          # l.151 store_true
    "atten_weight_uu": 1e-3,               # l.154 float
    "atten_weight_ud": 1e-3,               # l.155 float
    "reconstruct_weight_up": 1,            # l.156 type=float, default int 1 -> int
    "reconstruct_weight_usual": 1,         # l.157 int (same)
    "reconstruct_weight_down": 1,          # l.158 int (same)
    "mode": "concurrent",                  # l.160 choices concurrent, coarse_to_fine, fine_to_coarse
    "attn_loss_name": "CE",                # l.161 choices CE, byol
    "sim_threshold": 0.8,                  # l.164
    "granularity": 0,                      # l.165
    "encoder_weights": None,               # l.166
    "crop_scale_min": 0.2,                 # l.167
    "vis_mask_ratio": 0.0,                 # l.170
    "learning_loss": True,                 # l.172/173 store_true, set_defaults True
    "learn_feature_loss": "none",          # l.174
    "relative": False,                     # l.175 store_true
    "token_size": 6,                       # l.176 int(96 / 16)
    # ----- "simMIM" section (l.178-197): NOT read by the MiM model (models_convmae3d_v4.py)
    "num_classes": 0,                      # l.179
    "window_size": (7, 7, 7),              # l.180 type=tuple -> tuple
    "patch_size": (2, 2, 2),               # l.181 tuple
    "mask_patch_size": 16,                 # l.182
    "num_heads": [3, 6, 12, 24],           # l.183 type=list -> a LIST; the MiM builder hard-codes 12 (base) / 3 (tiny)
    "depths": [2, 2, 2, 2],                # l.184 list; MiM hard-codes depth=[2, 2, 2, 11]
    "embed_dim": 48,                       # l.185 int; MiM hard-codes [48, 96, 192, 384] / [12, 24, 48, 96]
    "mlp_ratio": 4.0,                      # l.186
    "drop_rate": 0.0,                      # l.187
    "attn_drop_rate": 0.0,                 # l.188
    "drop_path_rate": 0.0,                 # l.189
    "layer_decay": 1.0,                    # l.190
    "decoder": "upsample",                 # l.191
    "loss_type": "mask_only",              # l.192
    "img_size": 96,                        # l.193
    "in_channels": 1,                      # l.194
    "use_grad_checkpoint": False,          # l.195-197 store_true
    # ----- "SwinUNETR" section
    "spatial_dims": 3,                     # l.200
    "feature_size": 48,                    # l.201
    "dropout_path_rate": 0.0,              # l.202
    "use_checkpoint": False,               # l.203 store_true
    "test_one_epoch": False,               # l.205 store_true
}

# Attributes the training run adds to the Namespace before it is pickled (so a real checkpoint has them too):
#   utils/misc.py:21-22 setup():   distributed (bool, world_size > 1), rank (int)
#   utils/misc.py:40-47 setup():   resume <- "<logdir>/model_final.pt" or the last checkpoint-*.pth when found
#   main_pretrain.py:90:           lr = blr * batch_size * accum_iter * world_size * sw_batch_size / 256
#   main_pretrain.py:177:          rank = int(os.environ["LOCAL_RANK"]) (multi-GPU)
#   utils/misc.py:128 / :367-370:  start_epoch (from a resumed checkpoint, else 0)
RUNTIME_ONLY = ("distributed", "rank")

# The one pre-training script they publish: Pretrain/nscripts_gpu6/MiM/pretrain.sh (lines 12-28 and 35-59).
# Two GPUs (CUDA_VISIBLE_DEVICES=${mapping[4]},${mapping[1]}, line 12), torchrun, `--mode` not given -> concurrent.
PRETRAIN_SH: dict = {
    "batch_size": 1,
    "model_name": "convmae_convvit_base_patch16",
    "norm_pix_loss": True,
    "epochs": 800,
    "warmup_epochs": 40,
    "blr": 1e-4,
    "weight_decay": 0.05,
    "sw_batch_size": 4,
    "mask_ratio": 0.6,
    "num_workers": 16,
    "accum_iter": 64,
    "dataset_split": "1k",
    "data_path": "/home/jiaxin/data",
    "save_fq": 10,
    "cache_dir": "/data/jiaxin/cache/mmsmae_1k_231004",
    "dataset_loader": "mmsmae",
    "persistent_dataset": True,
    "sr_ratio": 1,
    "attn_loss_name": "byol",
    "atten_weight_uu": 0.1,
    "atten_weight_ud": 0.1,
    "reconstruct_weight_up": 1.0,
    "reconstruct_weight_usual": 1.0,
    "reconstruct_weight_down": 1.0,
    "logdir": "/home/jiaxin/ckpts/MiMMAE/MiM/pretrain",  # $prefix_dir/$exp (default_scripts/default.sh:9)
}


def authors_namespace(**overrides) -> argparse.Namespace:
    """`get_args().parse_args([])` of the authors' parser, then `overrides` set as attributes.

    Names must be parser names (DEFAULTS) or the run-time ones (RUNTIME_ONLY); anything else raises a TypeError
    so that a typo does not slip in silently. Values are taken as given: no argparse type conversion."""
    unknown = sorted(set(overrides) - set(DEFAULTS) - set(RUNTIME_ONLY))
    if unknown:
        raise TypeError(f"not an argument of the authors' parser: {', '.join(unknown)}")
    values = copy.deepcopy(DEFAULTS)
    values.update(overrides)
    return argparse.Namespace(**values)


def authors_pretrain_namespace(world_size: int = 2, rank: int = 0, **overrides) -> argparse.Namespace:
    """The Namespace that a run of their pretrain.sh pickles into its checkpoint: the defaults, pretrain.sh's flags,
    then what main_pretrain.py / utils/misc.py set at run time (rank, distributed, the lr computed from blr).
    `resume` stays "" (a fresh run that found no checkpoint to resume)."""
    values = {**PRETRAIN_SH, **overrides}
    eff_batch = values["batch_size"] * values["accum_iter"] * world_size * values["sw_batch_size"]
    if "lr" not in overrides:
        values["lr"] = values["blr"] * eff_batch / 256  # main_pretrain.py:89-90 (1e-4 * 512 / 256 = 2e-4)
    return authors_namespace(**values, rank=rank, distributed=world_size > 1)


def authors_checkpoint(model_state: dict, args: argparse.Namespace | None = None, epoch: int = 799,
                       optimizer_state: dict | None = None, scaler_state: dict | None = None) -> dict:
    """The dict their utils/misc.py:98-104 save_model() writes with torch.save (no 'model_ema' key for MiM:
    build_models returns model_ema=None). File names: checkpoint-<epoch>.pth (epoch % 100 == 0 or the last one)
    and checkpoint-final.pth (every save_fq epochs, overwritten), main_pretrain.py:131-140."""
    return {
        "model": model_state,
        "optimizer": optimizer_state if optimizer_state is not None else {"state": {}, "param_groups": []},
        "epoch": epoch,
        # NativeScalerWithGradNormCount.state_dict() = torch.cuda.amp.GradScaler().state_dict()
        "scaler": scaler_state if scaler_state is not None else {
            "scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000,
            "_growth_tracker": 0},
        "args": args if args is not None else authors_pretrain_namespace(),
    }


# --- their state dict, names and shapes (models_convmae3d_v4.py, MaskedAutoencoderConvViT3d) -------------------
VARIANTS = {
    # models_convmae3d_v4.py:492-508 and :540-556: the builders behind convmae_convvit_base_patch16 / _tiny_patch16
    "base": {"dims": (48, 96, 192, 384), "depths": (2, 2, 2, 11), "heads": 12, "dec_dim": 576, "dec_depth": 8,
             "dec_heads": 16},
    "tiny": {"dims": (12, 24, 48, 96), "depths": (2, 2, 2, 11), "heads": 3, "dec_dim": 576, "dec_depth": 8,
             "dec_heads": 16},
}
MODEL_NAMES = {"base": "convmae_convvit_base_patch16", "tiny": "convmae_convvit_tiny_patch16"}
ENCODER_PREFIXES = ("patch_embed1.", "patch_embed2.", "patch_embed3.", "patch_embed4.", "patch_embed5.",
                    "stage1_output_decode.", "stage2_output_decode.", "stage3_output_decode.", "pos_embed",
                    "blocks1.", "blocks2.", "blocks3.", "blocks4.", "norm.")
PRETRAIN_ONLY_PREFIXES = ("decoder_embed.", "mask_token", "decoder_pos_embed", "decoder_blocks.", "decoder_norm.",
                          "decoder_pred.", "aggregate_mid.", "aggregate_down.", "aggregate_pred_up_feature.",
                          "aggregate_pred_mid_feature.")


def authors_state_shapes(variant: str = "base", in_chans: int = 1, roi: int = 96,
                         dec_dim: int | None = None) -> dict[str, tuple[int, ...]]:
    """Every key of `MaskedAutoencoderConvViT3d(...).state_dict()` with its shape, in registration order. mlp_ratio
    4 everywhere; patch sizes 2, 2, 2, 2. `dec_dim` shrinks the pre-training-only decoder and heads (their 576 is
    39 M values even for tiny) without changing a key."""
    v = VARIANTS[variant]
    dims, depths, dec = v["dims"], v["depths"], dec_dim or v["dec_dim"]
    chans, n_tok = (in_chans, *dims), (roi // 16) ** 3
    # the module's own parameters come first in state_dict(), then its children in registration order
    out = {"pos_embed": (1, n_tok, dims[3]), "mask_token": (1, 1, dec), "decoder_pos_embed": (1, n_tok, dec)}
    for i in range(4):
        p = f"patch_embed{i + 1}."
        out.update({p + "proj.weight": (dims[i], chans[i], 2, 2, 2), p + "proj.bias": (dims[i],),
                    p + "norm.weight": (dims[i],), p + "norm.bias": (dims[i],)})
    out.update({"patch_embed5.weight": (dims[3], dims[3]), "patch_embed5.bias": (dims[3],)})
    for i, k in enumerate((8, 4, 2)):
        out.update({f"stage{i + 1}_output_decode.weight": (dims[3], dims[i], k, k, k),
                    f"stage{i + 1}_output_decode.bias": (dims[3],)})
    for s in range(3):
        d = dims[s]
        for j in range(depths[s]):
            p = f"blocks{s + 1}.{j}."
            out.update({p + "norm1.weight": (d,), p + "norm1.bias": (d,),
                        p + "conv1.weight": (d, d, 1, 1, 1), p + "conv1.bias": (d,),
                        p + "conv2.weight": (d, d, 1, 1, 1), p + "conv2.bias": (d,),
                        p + "attn.weight": (d, 1, 5, 5, 5), p + "attn.bias": (d,),
                        p + "norm2.weight": (d,), p + "norm2.bias": (d,),
                        p + "mlp.fc1.weight": (4 * d, d, 1, 1, 1), p + "mlp.fc1.bias": (4 * d,),
                        p + "mlp.fc2.weight": (d, 4 * d, 1, 1, 1), p + "mlp.fc2.bias": (d,)})

    def vit_block(p: str, d: int) -> None:
        out.update({p + "norm1.weight": (d,), p + "norm1.bias": (d,),
                    p + "attn.qkv.weight": (3 * d, d), p + "attn.qkv.bias": (3 * d,),
                    p + "attn.proj.weight": (d, d), p + "attn.proj.bias": (d,),
                    p + "norm2.weight": (d,), p + "norm2.bias": (d,),
                    p + "mlp.fc1.weight": (4 * d, d), p + "mlp.fc1.bias": (4 * d,),
                    p + "mlp.fc2.weight": (d, 4 * d), p + "mlp.fc2.bias": (d,)})

    for j in range(depths[3]):
        vit_block(f"blocks4.{j}.", dims[3])
    out.update({"norm.weight": (dims[3],), "norm.bias": (dims[3],)})
    # ----- pre-training only (decoder and cross-level alignment heads)
    out.update({"decoder_embed.weight": (dec, dims[3]), "decoder_embed.bias": (dec,)})
    for j in range(v["dec_depth"]):
        vit_block(f"decoder_blocks.{j}.", dec)
    out.update({"decoder_norm.weight": (dec,), "decoder_norm.bias": (dec,),
                "decoder_pred.weight": (16 ** 3 * in_chans, dec), "decoder_pred.bias": (16 ** 3 * in_chans,)})
    for head in ("aggregate_mid", "aggregate_down", "aggregate_pred_up_feature", "aggregate_pred_mid_feature"):
        out.update({f"{head}.fc1.weight": (dec, dec), f"{head}.fc1.bias": (dec,),
                    f"{head}.fc2.weight": (dec, dec), f"{head}.fc2.bias": (dec,)})
    return out


def authors_state_dict(variant: str = "tiny", roi: int = 96, dec_dim: int | None = 8, fill: str = "random",
                       seed: int = 0) -> dict[str, torch.Tensor]:
    """A state dict of their real keys and shapes (`dec_dim` as in authors_state_shapes).

    fill="random": weights ~ N(0, 1/fan_in), biases ~ N(0, 0.1^2), LayerNorm weights 1 + N(0, 0.1^2), position
    embedding ~ N(0, 0.1^2): every value matters, nothing is trivially 1 or 0. fill="constant": key number i holds
    the value i everywhere, as a stride-0 view of one number, so even the base model costs no memory and no disk,
    and a renamed tensor still tells which key it came from."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for i, (key, shape) in enumerate(authors_state_shapes(variant, roi=roi, dec_dim=dec_dim).items()):
        if fill == "constant":
            out[key] = torch.tensor(float(i)).expand(shape)
        elif key.endswith(("norm.weight", "norm1.weight", "norm2.weight")):  # LayerNorm scales
            out[key] = 1 + 0.1 * torch.randn(shape, generator=gen)
        elif key.endswith("bias") or "pos_embed" in key or key == "mask_token":
            out[key] = 0.1 * torch.randn(shape, generator=gen)
        else:
            fan_in = 1
            for n in shape[1:]:
                fan_in *= n
            out[key] = torch.randn(shape, generator=gen) / fan_in ** 0.5
    return out


def encoder_keys(state: dict) -> list[str]:
    return [k for k in state if k.startswith(ENCODER_PREFIXES)]


# --- their encoder's function, in plain torch --------------------------------------------------------------------
def _channel_norm(x: torch.Tensor, sd: dict, p: str, eps: float = 1e-5) -> torch.Tensor:
    """nn.LayerNorm(C) (eps 1e-5) over the channels of [B, C, D, H, W], as their x.permute(0, 2, 3, 4, 1) does."""
    y = F.layer_norm(x.permute(0, 2, 3, 4, 1), (x.shape[1],), sd[p + "weight"], sd[p + "bias"], eps)
    return y.permute(0, 4, 1, 2, 3)


def _patch_embed(x: torch.Tensor, sd: dict, i: int) -> torch.Tensor:
    """vision_transformer.py:186-214 PatchEmbed3d: Conv3d (kernel = stride) -> LayerNorm(C) -> GELU."""
    p = f"patch_embed{i}."
    w = sd[p + "proj.weight"]
    x = F.conv3d(x, w, sd[p + "proj.bias"], stride=w.shape[-1])
    return F.gelu(_channel_norm(x, sd, p + "norm."))


def _conv_block(x: torch.Tensor, sd: dict, p: str) -> torch.Tensor:
    """vision_transformer.py:101-128 CBlock3d (no mask, no drop path) and CMlp3d (1x1x1 convs, exact GELU)."""
    c = x.shape[1]
    y = F.conv3d(_channel_norm(x, sd, p + "norm1."), sd[p + "conv1.weight"], sd[p + "conv1.bias"])
    y = F.conv3d(y, sd[p + "attn.weight"], sd[p + "attn.bias"], padding=2, groups=c)
    x = x + F.conv3d(y, sd[p + "conv2.weight"], sd[p + "conv2.bias"])
    y = F.conv3d(_channel_norm(x, sd, p + "norm2."), sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"])
    return x + F.conv3d(F.gelu(y), sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"])


def _vit_block(x: torch.Tensor, sd: dict, p: str, heads: int, eps: float) -> torch.Tensor:
    """vision_transformer.py:131-183 Block with Attention (qkv bias, scale head_dim^-0.5) and Mlp; pre-norm."""
    b, n, c = x.shape
    y = F.layer_norm(x, (c,), sd[p + "norm1.weight"], sd[p + "norm1.bias"], eps)
    qkv = F.linear(y, sd[p + "attn.qkv.weight"], sd[p + "attn.qkv.bias"])
    q, k, v = qkv.reshape(b, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
    attn = ((q @ k.transpose(-2, -1)) * (c // heads) ** -0.5).softmax(dim=-1)
    y = (attn @ v).transpose(1, 2).reshape(b, n, c)
    x = x + F.linear(y, sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"])
    y = F.layer_norm(x, (c,), sd[p + "norm2.weight"], sd[p + "norm2.bias"], eps)
    y = F.linear(F.gelu(F.linear(y, sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"])), sd[p + "mlp.fc2.weight"],
                 sd[p + "mlp.fc2.bias"])
    return x + y


def authors_encoder_reference(sd: dict, x: torch.Tensor, heads: int,
                              vit_eps: float = 1e-6) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """models_convmae3d_v4.py:230-266 forward_encoder(x, mask_ratio=0), tokens back in raster order: x [B, C, R, R, R]
    -> (tokens [B, (R/16)^3, dims[3]], [stage 1, 2, 3 outputs [B, dims[i], R/2^(i+1), ...]]). `vit_eps` is their
    norm_layer's eps (partial(nn.LayerNorm, eps=1e-6)), which reaches the ViT blocks and the final norm only; their
    conv blocks and patch embeddings build nn.LayerNorm(dim) (eps 1e-5)."""
    side, feats = [], []
    for s in (1, 2, 3):
        x = _patch_embed(x, sd, s)
        j = 0
        while f"blocks{s}.{j}.norm1.weight" in sd:
            x = _conv_block(x, sd, f"blocks{s}.{j}.")
            j += 1
        feats.append(x)
        w = sd[f"stage{s}_output_decode.weight"]
        side.append(F.conv3d(x, w, sd[f"stage{s}_output_decode.bias"], stride=w.shape[-1]).flatten(2).transpose(1, 2))
    x = _patch_embed(x, sd, 4).flatten(2).transpose(1, 2)  # [B, N, C4], raster order
    x = F.linear(x, sd["patch_embed5.weight"], sd["patch_embed5.bias"]) + sd["pos_embed"]
    j = 0
    while f"blocks4.{j}.norm1.weight" in sd:
        x = _vit_block(x, sd, f"blocks4.{j}.", heads, vit_eps)
        j += 1
    x = x + side[0] + side[1] + side[2]
    return F.layer_norm(x, (x.shape[-1],), sd["norm.weight"], sd["norm.bias"], vit_eps), feats
