"""Pre-trained weights -> fine-tuning models: exact key reports for our checkpoints, the MiM authors' checkpoint
(in their real format: authors_format.py) and MONAI's SwinUNETR-SSL weights (fake state dicts built to their
published key names and shapes), the authors' weights computing their encoder's function, allow-listed unpickling,
position-embedding interpolation and first-conv channel repeat."""
from __future__ import annotations

import dataclasses
import os

import pytest
import torch
from authors_format import (
    MODEL_NAMES,
    PRETRAIN_ONLY_PREFIXES,
    authors_checkpoint,
    authors_encoder_reference,
    authors_namespace,
    authors_pretrain_namespace,
    authors_state_dict,
    encoder_keys,
)

from engine.config.finetune import build_finetune_config
from engine.config.pretrain import build_config
from engine.errors import UserError
from engine.finetuning.weights import (
    authors_encoder_config,
    authors_heads,
    interpolate_pos_embed,
    load_pretrained,
    read_pretrained,
    read_weights_file,
    repeat_first_conv,
)
from engine.inference.run import SegmentationPredictor
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


# --- the MiM authors' checkpoint, in their real format (authors_format.py: their parser's defaults as data, their
# state-dict keys and shapes, their encoder's function in plain torch)
def _authors_file(tmp_path, variant="tiny", fill="constant", roi=96, args=None):
    state = authors_state_dict(variant, roi=roi, fill=fill, seed=1)
    args = args if args is not None else authors_pretrain_namespace(model_name=MODEL_NAMES[variant])
    path = tmp_path / f"checkpoint-final-{variant}.pth"
    torch.save(authors_checkpoint(state, args), path)
    return path, state


def _encoder_config(weights, variant=None):
    cfg = build_finetune_config("tiny", encoder=weights.encoder).encoder
    return cfg if variant is None else dataclasses.replace(cfg, variant=variant)


def _relative_error(ours, reference):
    return ((ours - reference).norm() / reference.norm()).item()


def test_authors_checkpoint_needs_the_allow_list_and_loads_with_it(tmp_path):
    path, _ = _authors_file(tmp_path)
    with pytest.raises(Exception, match="Namespace"):
        torch.load(path, weights_only=True)  # why a plain weights-only load is not enough
    ckpt = read_weights_file(path)
    assert list(ckpt) == ["model", "optimizer", "epoch", "scaler", "args"]
    assert ckpt["args"].num_heads == [3, 6, 12, 24]  # their unused SimMIM option: a list, not the model's heads


@pytest.mark.parametrize("variant, heads", [("base", 12), ("tiny", 3)])
def test_authors_checkpoint_in_their_real_format_loads_with_an_exact_report(tmp_path, variant, heads):
    """Their real keys and shapes (243 encoder keys, incl. patch_embed5, and 120 pre-training ones), args as their
    pretrain.sh run pickles it. Every tensor holds its key's number, so a loaded tensor tells where it came from."""
    path, state = _authors_file(tmp_path, variant)
    weights = read_pretrained(path)
    dims = {"base": [48, 96, 192, 384], "tiny": [12, 24, 48, 96]}[variant]
    assert weights.family == "mim-authors"
    assert weights.encoder == {"in_channels": 1, "dims": dims, "depths": [2, 2, 2, 11], "strides": [2, 2, 2, 2],
                               "num_heads": heads, "mlp_ratio": 4.0, "conv_kernel": 5, "dropout": 0.0,
                               "variant": "authors"}
    seg = HybridSegmenter(_encoder_config(weights), 32, 2, feature_size=8)  # token grid 2^3; theirs is 6^3
    report = load_pretrained(seg, weights)
    encoder = {k for k in seg.state_dict() if k.startswith("encoder.")}
    assert set(report.loaded) == encoder and len(encoder) == 243
    assert set(report.missing) == _new_keys(seg)  # the position embedding came from them, interpolated
    assert report.unexpected == []
    assert sorted(report.ignored) == sorted(k for k in state if k.startswith(PRETRAIN_ONLY_PREFIXES))
    assert len(report.ignored) == 120
    number = {i: key for i, key in enumerate(state)}
    sd = seg.state_dict()
    source = {k: number[int(sd[k].flatten()[0])] for k in encoder if k != "encoder.pos_embed"}
    assert sorted(source.values()) == sorted(k for k in encoder_keys(state) if k != "pos_embed")  # one each
    assert all(torch.all(sd[k] == sd[k].flatten()[0]) for k in source)
    pairs = {"encoder.token_proj.weight": "patch_embed5.weight", "encoder.token_proj.bias": "patch_embed5.bias",
             "encoder.blocks.10.attn.out_proj.weight": "blocks4.10.attn.proj.weight",
             "encoder.blocks.0.attn.qkv.bias": "blocks4.0.attn.qkv.bias",
             "encoder.blocks.0.mlp.linear1.bias": "blocks4.0.mlp.fc1.bias",
             "encoder.conv_stages.2.1.dwconv.weight": "blocks3.1.attn.weight",
             "encoder.conv_stages.0.0.mlp.3.weight": "blocks1.0.mlp.fc2.weight",
             "encoder.conv_stages.1.0.norm1.norm.weight": "blocks2.0.norm1.weight",
             "encoder.embeds.3.norm.norm.bias": "patch_embed4.norm.bias",
             "encoder.stage_proj.0.weight": "stage1_output_decode.weight", "encoder.norm.weight": "norm.weight"}
    assert {k: source[k] for k in pairs} == pairs
    assert torch.allclose(sd["encoder.pos_embed"], interpolate_pos_embed(state["pos_embed"], 8))


def test_authors_head_count_comes_from_their_model_name_never_from_args_num_heads(tmp_path):
    state = authors_state_dict("tiny", fill="constant")
    assert authors_encoder_config(state, authors_pretrain_namespace(model_name=MODEL_NAMES["tiny"]))["num_heads"] == 3
    # their parser's default model_name is no MiM builder: head size 32, as in all of theirs
    assert authors_encoder_config(state, authors_namespace())["num_heads"] == 96 // 32
    assert authors_encoder_config(state, None)["num_heads"] == 3  # no args at all
    assert authors_heads(384, authors_namespace(model_name="convmae_convvit_base_patch16", num_heads=[1, 2])) == 12
    assert authors_heads(768, authors_namespace()) == 24
    with pytest.raises(UserError, match="attention heads"):
        authors_heads(100, authors_namespace())


# what feeds the ViT tokens: scaled down (to 1e-3), the tokens are so small that LayerNorm's eps shows
TOKEN_INPUTS = ("patch_embed5.", "pos_embed", "stage1_output_decode.", "stage2_output_decode.", "stage3_output_decode.")


@pytest.mark.parametrize("token_scale", [1.0, 1e-3])
def test_authors_weights_compute_their_encoder(tmp_path, token_scale):
    """Loaded through the reader, our "authors" variant equals an independent re-implementation of their
    forward_encoder (tokens and the stage features our decoder uses); our own variant with the same weights does not."""
    torch.manual_seed(0)
    state = authors_state_dict("tiny", roi=32, fill="random", seed=1)  # pos_embed for a 2^3 grid: used as is
    state.update({k: v * token_scale for k, v in state.items() if k.startswith(TOKEN_INPUTS)})
    path = tmp_path / "checkpoint-final.pth"
    torch.save(authors_checkpoint(state, authors_pretrain_namespace(model_name=MODEL_NAMES["tiny"])), path)
    weights = read_pretrained(path)
    seg = HybridSegmenter(_encoder_config(weights), 32, 2, feature_size=8).eval()
    load_pretrained(seg, weights)
    x = torch.rand(2, 1, 32, 32, 32)
    with torch.no_grad():
        reference, reference_feats = authors_encoder_reference(state, x, heads=3)
        tokens, feats = seg.encoder.forward_features(x)
    assert _relative_error(tokens, reference) < 1e-4
    for ours, theirs in zip(feats, reference_feats):
        assert _relative_error(ours, theirs) < 1e-4

    plain = HybridSegmenter(_encoder_config(weights, "mimslicer"), 32, 2, feature_size=8).eval()
    plain.load_state_dict({k: v for k, v in seg.state_dict().items() if "token_proj" not in k})
    with torch.no_grad():
        assert _relative_error(plain.encoder(x), reference) > 0.1


def test_authors_variant_travels_into_model_pt_and_back(tmp_path):
    """Fine-tuning's config comes from the weights; model.pt rebuilds the same network for inference, and a model.pt
    used as pre-trained weights keeps the variant and their position embedding."""
    torch.manual_seed(0)
    path, _ = _authors_file(tmp_path, "tiny", fill="random", roi=32)
    weights = read_pretrained(path)
    cfg = build_finetune_config("tiny", encoder=weights.encoder)
    assert cfg.encoder.variant == "authors" and cfg.to_dict()["encoder"]["variant"] == "authors"
    seg = HybridSegmenter(cfg.encoder, cfg.model.roi, 2, cfg.model.feature_size).eval()
    load_pretrained(seg, weights)
    model_pt = save_checkpoint(tmp_path / "model.pt", kind="segmentation", config=cfg.to_dict(), model=seg, step=1,
                               extra={"labels": {"background": 0, "liver": 1}, "spacing": [3.0, 3.0, 3.0],
                                      "hu_window": [-1000, 1000], "roi": cfg.model.roi})
    rebuilt = SegmentationPredictor.from_checkpoint(model_pt).model  # loads model.pt strictly
    assert rebuilt.encoder.cfg.variant == "authors"
    x = torch.rand(1, 1, 32, 32, 32)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), seg(x))

    again = read_pretrained(model_pt)
    assert again.encoder["variant"] == "authors" and "encoder.pos_embed" in again.state
    seg2 = HybridSegmenter(build_finetune_config("tiny", encoder=again.encoder).encoder, 32, 3, feature_size=8).eval()
    load_pretrained(seg2, again)
    with torch.no_grad():
        assert torch.equal(seg2.encoder(x), seg.encoder(x))


def test_our_checkpoint_without_a_variant_is_our_encoder(tmp_path):
    """A config saved before `encoder.variant` existed builds our encoder, whose weights it loads strictly."""
    path, _ = _pretrain_checkpoint(tmp_path)
    ckpt = read_weights_file(path)
    del ckpt["config"]["encoder"]["variant"]
    torch.save(ckpt, path)
    weights = read_pretrained(path)
    cfg = build_finetune_config("tiny", encoder=weights.encoder)
    assert cfg.encoder.variant == "mimslicer"
    seg = HybridSegmenter(cfg.encoder, 32, 2, feature_size=8)
    load_pretrained(seg, weights)
    assert "encoder.token_proj.weight" not in seg.state_dict()
    with pytest.raises(UserError, match="encoder.variant"):
        build_finetune_config("tiny", overrides={"encoder.variant": "author"})


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


def test_weights_carry_what_pre_training_saw(tmp_path):
    """Ours: the spacing and window of the pre-training config. The authors': their HU window (a_min, a_max) and
    no spacing, since they did not resample; said in a note. SwinUNETR-SSL: nothing known."""
    path, _ = _pretrain_checkpoint(tmp_path, overrides={"data.spacing": [4, 4, 4], "data.hu_window": [-500, 500]})
    assert read_pretrained(path).data == {"spacing": [4.0, 4.0, 4.0], "hu_window": [-500.0, 500.0]}
    weights = read_pretrained(_authors_file(tmp_path)[0])
    assert weights.data == {"hu_window": [-1000.0, 1000.0]}
    assert any("did not resample" in note and "spacing stays the preset's" in note for note in weights.notes)
