"""Pre-trained weights -> fine-tuning models: exact key reports for our checkpoints, the MiM authors' checkpoint
and MONAI's SwinUNETR-SSL weights (fake state dicts built to their published key names and shapes), allow-listed
unpickling, position-embedding interpolation and first-conv channel repeat."""
from __future__ import annotations

import argparse
import dataclasses
import os

import pytest
import torch

from engine.config.pretrain import build_config
from engine.errors import UserError
from engine.finetuning.weights import (
    interpolate_pos_embed,
    load_pretrained,
    read_pretrained,
    read_weights_file,
    repeat_first_conv,
)
from engine.models import build_pretrainer
from engine.models.classifier import HybridClassifier
from engine.models.segmenter import HybridSegmenter, SwinSegmenter
from engine.runtime.checkpoint import save_checkpoint

TINY = build_config("tiny")


def _pretrain_checkpoint(tmp_path, method="mim", overrides=None):
    cfg = build_config("tiny", method, overrides)
    torch.manual_seed(0)
    model = build_pretrainer(cfg)
    path = save_checkpoint(tmp_path / f"{method}.pt", kind="pretrain", config=cfg.to_dict(), model=model, step=2)
    return path, model


def _new_keys(model, prefix="encoder."):
    return {k for k in model.state_dict() if not k.startswith(prefix)}


def test_mim_checkpoint_loads_into_segmenter_with_exact_report(tmp_path):
    path, pretrainer = _pretrain_checkpoint(tmp_path)
    seg = HybridSegmenter(TINY.encoder, 32, 3, feature_size=8)
    report = load_pretrained(seg, read_pretrained(path))
    encoder_keys = {k for k in seg.state_dict() if k.startswith("encoder.")}
    assert set(report.loaded) == encoder_keys - {"encoder.pos_embed"}
    assert set(report.missing) == _new_keys(seg) | {"encoder.pos_embed"}
    assert report.unexpected == []
    assert {k.split(".")[0] for k in report.ignored} == {"decoder", "predictors", "projectors"}
    for name, value in pretrainer.encoder.state_dict().items():
        assert torch.equal(seg.encoder.state_dict()[name], value), name


def test_hybridmim_hybrid_backbone_uses_its_encoder_prefix(tmp_path):
    path, pretrainer = _pretrain_checkpoint(tmp_path, "hybridmim", {"hybridmim.backbone": "hybrid"})
    cls = HybridClassifier(TINY.encoder, 64, num_classes=2)
    report = load_pretrained(cls, read_pretrained(path))
    assert set(report.missing) == {"head.1.weight", "head.1.bias", "encoder.pos_embed"}
    qkv = "blocks.0.attn.qkv.weight"
    assert torch.equal(cls.encoder.state_dict()[qkv], pretrainer.backbone.encoder.state_dict()[qkv])


def test_hybridmim_unet_checkpoint_is_refused_with_a_reason(tmp_path):
    path, _ = _pretrain_checkpoint(tmp_path, "hybridmim")
    with pytest.raises(UserError, match="UNet backbone"):
        read_pretrained(path)


def test_encoder_mismatch_names_the_key_and_shapes(tmp_path):
    path, _ = _pretrain_checkpoint(tmp_path)
    wider = dataclasses.replace(TINY.encoder, dims=(12, 24, 48, 192))
    with pytest.raises(UserError, match=r"is \[.*\] in the checkpoint but \[.*\] in the model"):
        load_pretrained(HybridSegmenter(wider, 32, 2, feature_size=8), read_pretrained(path))


# --- the MiM authors' MaskedAutoencoderConvViT3d (models_convmae3d_v4.py): names and shapes of its state dict
def authors_state_dict(dims=(12, 24, 48, 96), depths=(1, 1, 1, 2), roi=96, dec=48, mlp=4) -> dict:
    g, chans, sd = roi // 16, (1, *dims), {}
    t = lambda *shape: torch.randn(*shape)  # noqa: E731
    for i in range(4):
        sd[f"patch_embed{i + 1}.proj.weight"], sd[f"patch_embed{i + 1}.proj.bias"] = t(dims[i], chans[i], 2, 2, 2), t(dims[i])
        sd[f"patch_embed{i + 1}.norm.weight"], sd[f"patch_embed{i + 1}.norm.bias"] = t(dims[i]), t(dims[i])
    sd["patch_embed5.weight"], sd["patch_embed5.bias"] = t(dims[3], dims[3]), t(dims[3])
    for i, k in enumerate((8, 4, 2)):
        sd[f"stage{i + 1}_output_decode.weight"], sd[f"stage{i + 1}_output_decode.bias"] = t(dims[3], dims[i], k, k, k), t(dims[3])
    sd["pos_embed"] = t(1, g**3, dims[3])
    for s in range(3):
        d = dims[s]
        for j in range(depths[s]):
            p = f"blocks{s + 1}.{j}."
            sd.update({p + "norm1.weight": t(d), p + "norm1.bias": t(d), p + "conv1.weight": t(d, d, 1, 1, 1),
                       p + "conv1.bias": t(d), p + "conv2.weight": t(d, d, 1, 1, 1), p + "conv2.bias": t(d),
                       p + "attn.weight": t(d, 1, 5, 5, 5), p + "attn.bias": t(d), p + "norm2.weight": t(d),
                       p + "norm2.bias": t(d), p + "mlp.fc1.weight": t(mlp * d, d, 1, 1, 1), p + "mlp.fc1.bias": t(mlp * d),
                       p + "mlp.fc2.weight": t(d, mlp * d, 1, 1, 1), p + "mlp.fc2.bias": t(d)})
    d = dims[3]
    for j in range(depths[3]):
        p = f"blocks4.{j}."
        sd.update({p + "norm1.weight": t(d), p + "norm1.bias": t(d), p + "attn.qkv.weight": t(3 * d, d),
                   p + "attn.qkv.bias": t(3 * d), p + "attn.proj.weight": t(d, d), p + "attn.proj.bias": t(d),
                   p + "norm2.weight": t(d), p + "norm2.bias": t(d), p + "mlp.fc1.weight": t(mlp * d, d),
                   p + "mlp.fc1.bias": t(mlp * d), p + "mlp.fc2.weight": t(d, mlp * d), p + "mlp.fc2.bias": t(d)})
    sd["norm.weight"], sd["norm.bias"] = t(d), t(d)
    sd.update({"decoder_embed.weight": t(dec, d), "decoder_embed.bias": t(dec), "mask_token": t(1, 1, dec),
               "decoder_pos_embed": t(1, g**3, dec), "decoder_blocks.0.norm1.weight": t(dec),
               "decoder_blocks.0.attn.qkv.weight": t(3 * dec, dec), "decoder_norm.weight": t(dec),
               "decoder_pred.weight": t(16**3, dec), "aggregate_mid.fc1.weight": t(dec, dec),
               "aggregate_down.fc2.bias": t(dec), "aggregate_pred_up_feature.fc1.weight": t(dec, dec),
               "aggregate_pred_mid_feature.fc2.weight": t(dec, dec)})
    return sd


@pytest.fixture
def authors_file(tmp_path):
    torch.manual_seed(1)
    state = authors_state_dict()
    args = argparse.Namespace(model_name="MiM", mask_ratio=0.6, num_heads=3, sr_ratio=1, attn_loss_name="byol")
    path = tmp_path / "mim_authors.pth"
    torch.save({"model": state, "optimizer": {"state": {}, "param_groups": []}, "epoch": 99, "args": args}, path)
    return path, state


def test_authors_checkpoint_needs_the_allow_list_and_loads_with_it(authors_file):
    path, _ = authors_file
    with pytest.raises(Exception, match="Namespace"):
        torch.load(path, weights_only=True)  # why a plain weights-only load is not enough
    assert read_weights_file(path)["args"].num_heads == 3


def test_authors_checkpoint_key_map_and_report(authors_file):
    path, state = authors_file
    weights = read_pretrained(path)
    assert weights.family == "mim-authors"
    assert weights.encoder == {"in_channels": 1, "dims": [12, 24, 48, 96], "depths": [1, 1, 1, 2],
                               "strides": [2, 2, 2, 2], "num_heads": 3, "mlp_ratio": 4.0, "conv_kernel": 5,
                               "dropout": 0.0}
    enc = dataclasses.replace(TINY.encoder, depths=(1, 1, 1, 2))
    seg = HybridSegmenter(enc, 32, 2, feature_size=8)  # token grid 2^3; theirs is 6^3
    report = load_pretrained(seg, weights)
    assert set(report.missing) == _new_keys(seg)  # position embedding came from them, interpolated
    assert set(report.loaded) == {k for k in seg.state_dict() if k.startswith("encoder.")}
    assert report.dropped == ["patch_embed5.bias", "patch_embed5.weight"]
    assert {k.split(".")[0].split("_")[0] for k in report.ignored} == {"decoder", "mask", "aggregate"}
    sd = seg.state_dict()
    pairs = {"encoder.blocks.1.attn.out_proj.weight": "blocks4.1.attn.proj.weight",
             "encoder.blocks.0.mlp.linear1.bias": "blocks4.0.mlp.fc1.bias",
             "encoder.conv_stages.2.0.dwconv.weight": "blocks3.0.attn.weight",
             "encoder.conv_stages.0.0.mlp.3.weight": "blocks1.0.mlp.fc2.weight",
             "encoder.conv_stages.1.0.norm1.norm.weight": "blocks2.0.norm1.weight",
             "encoder.embeds.3.norm.norm.bias": "patch_embed4.norm.bias",
             "encoder.stage_proj.0.weight": "stage1_output_decode.weight", "encoder.norm.weight": "norm.weight"}
    for ours, theirs in pairs.items():
        assert torch.equal(sd[ours], state[theirs]), ours
    assert torch.allclose(sd["encoder.pos_embed"], interpolate_pos_embed(state["pos_embed"], 8))


def test_pickled_code_is_refused(tmp_path):
    class Exploit:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    path = tmp_path / "evil.pt"
    torch.save({"model": {}, "args": Exploit()}, path)
    with pytest.raises(UserError, match="refused to load"):
        read_weights_file(path)


def test_position_embedding_interpolation_keeps_a_smooth_field():
    g = torch.arange(6.0)
    field = (g[:, None, None] + 0 * g[None, :, None] + 0 * g[None, None, :]).reshape(1, 216, 1).repeat(1, 1, 6)
    same = interpolate_pos_embed(field, 216)
    assert torch.allclose(same, field)
    small = interpolate_pos_embed(field, 27).reshape(3, 3, 3, 6)
    assert torch.all(small[1:, ..., 0] > small[:-1, ..., 0])  # still increasing along the first axis
    assert torch.allclose(small[:, 0, 0, 0], small[:, 2, 1, 0])  # still constant along the others


def test_first_conv_is_repeated_over_input_channels(tmp_path):
    path, pretrainer = _pretrain_checkpoint(tmp_path)
    enc = dataclasses.replace(TINY.encoder, in_channels=3)
    seg = HybridSegmenter(enc, 32, 2, feature_size=8)
    load_pretrained(seg, read_pretrained(path))
    w1 = pretrainer.encoder.embeds[0].proj.weight
    assert torch.allclose(seg.encoder.embeds[0].proj.weight, w1.repeat(1, 3, 1, 1, 1) / 3)
    x = torch.randn(1, 1, 32, 32, 32)
    same = seg.encoder.embeds[0].proj(x.repeat(1, 3, 1, 1, 1))
    assert torch.allclose(same, pretrainer.encoder.embeds[0].proj(x), atol=1e-5)
    assert repeat_first_conv(torch.ones(4, 1, 2, 2, 2), 2).shape == (4, 2, 2, 2, 2)


# --- MONAI SwinUNETR-SSL model_swinvit.pt: {"state_dict": {"module.<Swin-ViT key>"}} with timm-style MLP names
def swin_ssl_state_dict(feature_size: int) -> dict:
    reference = SwinSegmenter(1, 2, feature_size).swinViT.state_dict()
    renamed = {"module." + k.replace("mlp.linear1", "mlp.fc1").replace("mlp.linear2", "mlp.fc2"): torch.randn_like(v.float())
               if v.is_floating_point() else v for k, v in reference.items()}
    renamed.update({"module.rotation_head.weight": torch.randn(4, 16 * feature_size),
                    "module.contrastive_head.weight": torch.randn(512, 16 * feature_size),
                    "module.conv.0.weight": torch.randn(8, 16 * feature_size, 3, 3, 3)})
    return {"state_dict": renamed}


def test_swinunetr_ssl_weights_feed_monai_swinunetr(tmp_path):
    torch.manual_seed(2)
    ssl = swin_ssl_state_dict(12)
    path = tmp_path / "model_swinvit.pt"
    torch.save(ssl, path)
    weights = read_pretrained(path)
    assert (weights.family, weights.backbone, weights.feature_size) == ("swinunetr-ssl", "swinunetr", 12)
    seg = SwinSegmenter(1, 3, 12)
    report = load_pretrained(seg, weights)
    assert set(report.missing) == _new_keys(seg, "swinViT.")
    assert set(report.loaded) == {k for k in seg.state_dict() if k.startswith("swinViT.")}
    assert sorted(report.ignored) == ["module.contrastive_head.weight", "module.conv.0.weight",
                                      "module.rotation_head.weight"]
    theirs = ssl["state_dict"]["module.layers2.0.blocks.1.mlp.fc2.weight"]
    assert torch.equal(seg.swinViT.layers2[0].blocks[1].mlp.linear2.weight, theirs)


def test_weights_carry_what_pre_training_saw(tmp_path, authors_file):
    """Ours: the spacing and window of the pre-training config. The authors': their HU window (a_min, a_max) and
    no spacing, since they did not resample; said in a note. SwinUNETR-SSL: nothing known."""
    path, _ = _pretrain_checkpoint(tmp_path, overrides={"data.spacing": [4, 4, 4], "data.hu_window": [-500, 500]})
    assert read_pretrained(path).data == {"spacing": [4.0, 4.0, 4.0], "hu_window": [-500.0, 500.0]}
    weights = read_pretrained(authors_file[0])
    assert weights.data == {"hu_window": [-1000.0, 1000.0]}
    assert any("did not resample" in note and "spacing stays the preset's" in note for note in weights.notes)
