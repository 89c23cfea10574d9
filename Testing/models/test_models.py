"""Models: MAE gather equals drop-after-encode, no leak from masked voxels, every parameter learns (pre-training
models and both segmenter decoders), alignment compares a child with its parent's block (not with itself, the
authors' defect)."""
import pytest
import torch

from engine.config.pretrain import build_config
from engine.masking import make_mim_views, random_mask
from engine.models import build_pretrainer
from engine.models.hybrid_encoder import HybridEncoder, gather_tokens
from engine.models.segmenter import HybridSegmenter


def tiny_encoder(roi=32):
    torch.manual_seed(0)
    return HybridEncoder(build_config("tiny").encoder, roi).eval()


def test_visible_token_encoding_equals_full_encoding_with_masked_tokens_dropped():
    enc = tiny_encoder(64)  # 4^3 = 64 tokens
    x = torch.rand(3, 1, 64, 64, 64)
    m = random_mask(3, 64, 0.6, torch.Generator().manual_seed(0))
    gathered = enc(x, m.keep, m.mask)
    # the same network, run on every token, then the masked ones removed before the transformer
    feats_tokens, side = _all_tokens(enc, x, m.mask)
    tokens = gather_tokens(feats_tokens, m.keep)
    side = gather_tokens(side, m.keep)
    for block in enc.blocks:
        tokens = block(tokens)
    assert torch.allclose(gathered, enc.norm(tokens + side), atol=1e-5)


def _all_tokens(enc, x, mask):
    """Stage 1-3 with the visibility mask, stage-4 tokens for all positions (reference path): every layer as the
    plain convolution of its `nn.Conv3d` on [B, C, D, H, W], where the encoder runs matrix multiplies on
    channels-last tensors."""
    def norm(wrapper, t):  # a channel LayerNorm of [B, C, D, H, W]
        return wrapper.norm(t.permute(0, 2, 3, 4, 1)).permute(0, 4, 1, 2, 3)

    grid = tuple(side // enc.patch for side in x.shape[2:])
    visible = (~mask).float().reshape(x.shape[0], 1, *grid)
    feats = []
    for i in range(3):
        x = norm(enc.embeds[i].norm, enc.embeds[i].proj(x))
        vis = torch.nn.functional.interpolate(visible, size=x.shape[2:], mode="nearest")
        for block in enc.conv_stages[i]:
            x = x + block.conv2(block.dwconv(block.conv1(norm(block.norm1, x)) * vis))
            x = x + block.mlp(norm(block.norm2, x))
        x = x * vis
        feats.append(x)
    x = norm(enc.embeds[3].norm, enc.embeds[3].proj(x))
    tokens = x.flatten(2).transpose(1, 2) + enc._position(grid, x)
    side = sum(p(f).flatten(2).transpose(1, 2) for p, f in zip(enc.stage_proj, feats))
    return tokens, side


def test_encoder_equals_its_convolutions_in_value_and_gradient():
    """The channels-last matrix-multiply encoder (and its own depth-wise backward) against plain convolutions,
    on a non-cubic input as in fine-tuning."""
    enc = tiny_encoder(32)
    x = torch.rand(2, 1, 32, 48, 32)
    tokens, feats = enc.forward_features(x)
    ref, side = _all_tokens(enc, x, torch.zeros(2, 2 * 3 * 2, dtype=torch.bool))
    for block in enc.blocks:
        ref = block(ref)
    ref = enc.norm(ref + side)
    assert feats[0].shape == (2, enc.cfg.dims[0], 16, 24, 16)
    assert torch.allclose(tokens, ref, atol=1e-5)
    cotangent = torch.randn_like(ref)
    ref.backward(cotangent)
    reference = {n: p.grad.clone() for n, p in enc.named_parameters()}
    enc.zero_grad()
    tokens.backward(cotangent)
    for n, p in enc.named_parameters():
        assert torch.allclose(p.grad, reference[n], atol=1e-5, rtol=1e-3), n


def test_masked_voxels_do_not_leak_into_visible_tokens():
    enc = tiny_encoder(64)
    x = torch.rand(2, 1, 64, 64, 64)
    m = random_mask(2, 64, 0.5, torch.Generator().manual_seed(1))
    voxel_mask = m.mask.float().reshape(2, 1, 4, 4, 4).repeat_interleave(16, 2).repeat_interleave(16, 3).repeat_interleave(16, 4)
    noisy = x + voxel_mask * torch.randn_like(x) * 10  # change only what is masked
    with torch.no_grad():
        assert torch.allclose(enc(x, m.keep, m.mask), enc(noisy, m.keep, m.mask), atol=1e-5)


CASES = [
    ("mim", {}),
    ("mim", {"loss.align": "ce"}),
    ("mim", {"mask.levels": 2}),
    ("mim", {"loss.curriculum": "coarse_to_fine"}),
    ("mae", {}),
    ("hybridmim", {}),
    ("hybridmim", {"hybridmim.backbone": "hybrid"}),
    ("hybridmim", {"hybridmim.partial": False}),
]


@pytest.mark.parametrize("method,overrides", CASES, ids=[f"{m}-{o}" for m, o in CASES])
def test_every_parameter_gets_a_finite_gradient(method, overrides):
    torch.manual_seed(0)
    cfg = build_config("tiny", method, overrides)
    model = build_pretrainer(cfg)
    g = torch.Generator().manual_seed(0)
    if method == "hybridmim":
        losses = model(torch.rand(2, 1, cfg.mask.roi, cfg.mask.roi, cfg.mask.roi), g)
    else:
        crops = torch.rand(cfg.data.batch_size, 1, *(cfg.crop_size,) * 3)
        losses = model(make_mim_views(crops, cfg.mask, model.patch, g), progress=0.3)
    assert torch.isfinite(losses["loss"])
    losses["loss"].backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"parameters without gradient: {missing}"
    bad = [n for n, p in model.named_parameters() if not torch.isfinite(p.grad).all()]
    assert not bad, f"non-finite gradients: {bad}"


@pytest.mark.parametrize("decoder", ["unetr", "light"])
def test_segmenter_gives_logits_and_every_parameter_learns(decoder):
    torch.manual_seed(0)
    model = HybridSegmenter(build_config("tiny").encoder, 32, 3, feature_size=8, decoder=decoder)
    logits = model(torch.rand(2, 1, 32, 32, 32))
    assert logits.shape == (2, 3, 32, 32, 32)
    logits.square().mean().backward()
    bad = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not bad, f"parameters without a finite gradient: {bad}"


def test_the_light_decoder_thins_only_the_full_resolution_level():
    unetr, light = (HybridSegmenter(build_config("tiny").encoder, 32, 3, feature_size=8, decoder=d).state_dict()
                    for d in ("unetr", "light"))
    full_res = ("skips.0.", "ups.3.", "out.")
    assert {k: v.shape for k, v in unetr.items() if not k.startswith(full_res)} == \
        {k: v.shape for k, v in light.items() if not k.startswith(full_res)}
    assert sum(v.numel() for k, v in light.items() if k.startswith(full_res)) < \
        sum(v.numel() for k, v in unetr.items() if k.startswith(full_res)) / 3


def test_level_by_level_backward_equals_one_summed_backward():
    torch.manual_seed(0)
    cfg = build_config("tiny", "mim")
    model = build_pretrainer(cfg)
    crops = torch.rand(1, 1, 64, 64, 64)
    levels = make_mim_views(crops, cfg.mask, model.patch, torch.Generator().manual_seed(0))
    model(levels)["loss"].backward()
    summed = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    for level in model.level_outputs(levels):
        level.total.backward()
    for n, p in model.named_parameters():
        assert torch.allclose(p.grad, summed[n], atol=1e-6, rtol=1e-4), n


@pytest.mark.parametrize("align", ["byol", "ce"])
@pytest.mark.parametrize("views_per_pass", [1, 3])
def test_views_a_few_at_a_time_give_the_same_losses_and_gradients(align, views_per_pass):
    """A level's views in passes of `views_per_pass` (3 does not divide the 4 or 16 views of a level): the
    passes' loss shares add up to the level's losses and the gradients equal those of one pass per level."""
    torch.manual_seed(0)
    cfg = build_config("tiny", "mim", {"loss.align": align})
    model = build_pretrainer(cfg)
    levels = make_mim_views(torch.rand(1, 1, 64, 64, 64), cfg.mask, model.patch, torch.Generator().manual_seed(0))
    whole: dict[str, float] = {}
    for level in model.level_outputs(levels):
        level.total.backward()
        whole.update({k: float(v.detach()) for k, v in level.losses.items()})
    reference = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    shares: dict[str, float] = {}
    passes = 0
    for level in model.level_outputs(levels, views_per_pass=views_per_pass):
        assert level.pred.shape[0] == level.views.stop - level.views.start <= views_per_pass
        level.total.backward()
        passes += 1
        for k, v in level.losses.items():
            shares[k] = shares.get(k, 0.0) + float(v.detach())
    assert passes == sum(-(-lv.images.shape[0] // views_per_pass) for lv in levels)
    assert shares.keys() == whole.keys() and all(abs(shares[k] - whole[k]) < 1e-5 for k in whole), (shares, whole)
    for n, p in model.named_parameters():
        assert torch.allclose(p.grad, reference[n], atol=1e-6, rtol=1e-4), n


@pytest.mark.parametrize("align", ["byol", "ce"])
def test_alignment_uses_the_parent_block_the_child_came_from(align):
    """Changing the parent's features of the child's own block changes the loss; other blocks do not (byol).
    The authors' L1-L2 byol compared middle features with themselves: there the parent would not matter at all."""
    torch.manual_seed(0)
    cfg = build_config("tiny", "mim", {"loss.align": align, "mask.levels": 2})
    model = build_pretrainer(cfg).eval()
    _, middle = make_mim_views(torch.rand(1, 1, 64, 64, 64), cfg.mask, model.patch, torch.Generator().manual_seed(0))
    tokens = torch.randn(middle.images.shape[0], 4, model.encoder.out_dim)
    parent_blocks = torch.randn(1, 8, cfg.decoder.dim)
    base = model._alignment(0, tokens, parent_blocks, middle)
    own = int(middle.parent_block[0])
    other = next(b for b in range(8) if b not in middle.parent_block.tolist())
    changed_own, changed_other = parent_blocks.clone(), parent_blocks.clone()
    changed_own[0, own] = torch.randn(cfg.decoder.dim)
    changed_other[0, other] = torch.randn(cfg.decoder.dim)
    assert not torch.allclose(model._alignment(0, tokens, changed_own, middle), base)
    if align == "byol":
        assert torch.allclose(model._alignment(0, tokens, changed_other, middle), base)
    else:  # an 8-way localisation: the target is the block the child was cut from
        child = model.predictors[0](tokens.mean(1))
        parents = model.projectors[0](parent_blocks[middle.parent])
        logits = torch.nn.functional.cosine_similarity(child[:, None], parents, dim=-1) / cfg.loss.ce_temperature
        expected = torch.nn.functional.cross_entropy(logits, middle.parent_block)
        assert torch.allclose(base, expected)


def test_parent_block_features_are_the_parents_decoder_tokens_of_that_block():
    """The features handed from level to level pool exactly the tokens of each block of the parent."""
    from engine.losses import pool_blocks
    from engine.masking import octant_of_token
    latent = torch.randn(2, 64, 5)
    blocks = octant_of_token(4)
    pooled = pool_blocks(latent, blocks, 8)
    for b in range(8):
        assert torch.allclose(pooled[:, b], latent[:, blocks == b].mean(1), atol=1e-6)
