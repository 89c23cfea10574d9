"""Models: MAE gather equals drop-after-encode, no leak from masked voxels, every parameter learns (pre-training
models and both segmenter decoders), alignment compares a child with its parent's block (not with itself, the
authors' defect), against centred targets that no constant matches, and ce chooses among the parent's masked blocks
only; the encoder's two variants (ours, with the keys it always had, and the authors')."""
import dataclasses
import json
from pathlib import Path

import pytest
import torch

from engine.config.pretrain import build_config
from engine.losses import (
    byol_alignment,
    ce_alignment,
    masked_blocks,
    spread,
    wrong_block_gap,
)
from engine.masking import make_mim_views, random_mask
from engine.models import build_pretrainer
from engine.models import hybrid_encoder
from engine.models.hybrid_encoder import HybridEncoder, depthwise, depthwise_weight_grad, gather_tokens
from engine.runtime.device import guard_small_convolutions
from engine.models.segmenter import HybridSegmenter


VARIANTS = ("mimslicer", "authors")


def tiny_encoder(roi=32, variant="mimslicer"):
    torch.manual_seed(0)
    return HybridEncoder(dataclasses.replace(build_config("tiny").encoder, variant=variant), roi).eval()


@pytest.mark.parametrize("variant", VARIANTS)
def test_visible_token_encoding_equals_full_encoding_with_masked_tokens_dropped(variant):
    enc = tiny_encoder(64, variant)  # 4^3 = 64 tokens
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
        x = enc.embeds[i].act(norm(enc.embeds[i].norm, enc.embeds[i].proj(x)))
        vis = torch.nn.functional.interpolate(visible, size=x.shape[2:], mode="nearest")
        for block in enc.conv_stages[i]:
            x = x + block.conv2(block.dwconv(block.conv1(norm(block.norm1, x)) * vis))
            x = x + block.mlp(norm(block.norm2, x))
        x = x * vis
        feats.append(x)
    x = enc.embeds[3].act(norm(enc.embeds[3].norm, enc.embeds[3].proj(x)))
    tokens = x.flatten(2).transpose(1, 2)
    if enc.token_proj is not None:
        tokens = enc.token_proj(tokens)
    tokens = tokens + enc._position(grid, x)
    side = sum(p(f).flatten(2).transpose(1, 2) for p, f in zip(enc.stage_proj, feats))
    return tokens, side


@pytest.mark.parametrize("variant", VARIANTS)
def test_encoder_equals_its_convolutions_in_value_and_gradient(variant):
    """The channels-last matrix-multiply encoder (and its own depth-wise backward) against plain convolutions,
    on a non-cubic input as in fine-tuning."""
    enc = tiny_encoder(32, variant)
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
    for n, p in enc.named_parameters():  # summation orders differ (kernels, threads): relative to the gradient's norm
        err, norm = float((p.grad - reference[n]).norm()), float(reference[n].norm())
        assert err <= 1e-5 * norm, (n, err, norm)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("side,kernel", [(9, 5), (4, 5), (2, 3)], ids=["map9-k5", "map4-k5", "map2-k3"])
def test_depthwise_weight_gradient_as_a_forward_convolution_is_the_weight_gradient(side, kernel, dtype):
    """`depthwise_weight_grad` (the custom backward's weight gradient) against autograd in float64: two samples,
    a non-cubic map, maps smaller than the kernel too; in bf16 within the inputs' rounding."""
    torch.manual_seed(0)
    x = torch.randn(2, 6, side, side + 1, side, dtype=torch.float64)
    weight = torch.randn(6, 1, kernel, kernel, kernel, dtype=torch.float64, requires_grad=True)
    y = torch.nn.functional.conv3d(x, weight, padding=kernel // 2, groups=6)
    cotangent = torch.randn_like(y)
    y.backward(cotangent)
    got = depthwise_weight_grad(x.to(dtype).contiguous(memory_format=torch.channels_last_3d), cotangent.to(dtype),
                                kernel // 2)
    assert got.shape == weight.shape and got.dtype == dtype
    assert (got.double() - weight.grad).norm() <= (1e-5 if dtype == torch.float32 else 1e-2) * weight.grad.norm()


@pytest.mark.parametrize("side", [4, 9], ids=["map4", "map9"])
@pytest.mark.parametrize("groups,fast_bf16", [(1, None), (48, True), (48, False)],
                         ids=["dense", "depthwise-as-forward", "depthwise-onednn"])
def test_weight_gradient_of_a_map_smaller_than_the_kernel_is_right_under_bf16_autocast(groups, fast_bf16, side,
                                                                                       monkeypatch):
    """oneDNN's AVX-512 BF16 weight gradient is wrong (garbage, inf, NaN) when a side of the input is shorter than the
    kernel, e.g. the 1/16 skip of the segmenter at ROI 32 (2^3) or stage 3 of the encoder (4^3, kernel 5). The
    depth-wise backward takes the forward-convolution form where bf16 is native and oneDNN's backward where it is
    emulated: both ways, on any CPU."""
    if fast_bf16 is not None:
        monkeypatch.setattr(hybrid_encoder, "cpu_has_fast_bf16", lambda: fast_bf16)
    torch.manual_seed(0)
    kernel = 3 if groups == 1 else 5
    side = 2 if groups == 1 and side == 4 else side
    conv = guard_small_convolutions(torch.nn.Conv3d(48, 48, kernel, padding=kernel // 2, groups=groups))
    x = torch.randn(2, side, side, side, 48)  # channels-last, as the encoder's stages and the decoder see them
    cotangent = torch.randn(2, side, side, side, 48)
    reference = conv.double()(x.double().permute(0, 4, 1, 2, 3)).permute(0, 2, 3, 4, 1)
    reference.backward(cotangent.double())
    expected, conv = conv.weight.grad.clone(), conv.float()
    conv.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = depthwise(x, conv) if groups > 1 else conv(x.permute(0, 4, 1, 2, 3)).permute(0, 2, 3, 4, 1)
    y.backward(cotangent.to(y.dtype))
    assert torch.isfinite(conv.weight.grad).all()
    assert (conv.weight.grad.double() - expected).norm() <= 0.02 * expected.norm()


@pytest.mark.parametrize("variant", VARIANTS)
def test_masked_voxels_do_not_leak_into_visible_tokens(variant):
    enc = tiny_encoder(64, variant)
    x = torch.rand(2, 1, 64, 64, 64)
    m = random_mask(2, 64, 0.5, torch.Generator().manual_seed(1))
    voxel_mask = m.mask.float().reshape(2, 1, 4, 4, 4).repeat_interleave(16, 2).repeat_interleave(16, 3).repeat_interleave(16, 4)
    noisy = x + voxel_mask * torch.randn_like(x) * 10  # change only what is masked
    with torch.no_grad():
        assert torch.allclose(enc(x, m.keep, m.mask), enc(noisy, m.keep, m.mask), atol=1e-5)


def test_our_encoder_keeps_its_keys_and_the_authors_variant_adds_only_their_linear():
    """Our variant's state dict is, name for name and shape for shape, the one of commit da25336 (before the
    variants), so every checkpoint of ours still loads strictly; the authors' variant adds token_proj (their
    patch_embed5) and differs in what has no weights: a GELU per patch embedding, eps 1e-6 in the ViT norms."""
    saved = json.loads((Path(__file__).parent / "mimslicer_encoder_keys_tiny.json").read_text())
    ours, theirs = tiny_encoder(32), tiny_encoder(32, "authors")
    assert {k: list(v.shape) for k, v in ours.state_dict().items()} == saved
    assert list(ours.state_dict()) == list(saved)  # the order, too
    ours.load_state_dict({k: torch.zeros(shape) for k, shape in saved.items()}, strict=True)
    extra = {k: list(v.shape) for k, v in theirs.state_dict().items() if k not in saved}
    assert extra == {"token_proj.weight": [96, 96], "token_proj.bias": [96]}
    assert set(saved) <= set(theirs.state_dict())

    def eps(enc):
        vit = {n.eps for b in enc.blocks for n in (b.norm1, b.norm2)} | {enc.norm.eps}
        conv = {m.eps for m in [*enc.embeds.modules(), *enc.conv_stages.modules()] if isinstance(m, torch.nn.LayerNorm)}
        return vit, conv

    assert eps(ours) == ({1e-5}, {1e-5})
    assert eps(theirs) == ({1e-6}, {1e-5})
    assert all(isinstance(e.act, torch.nn.Identity) for e in ours.embeds)
    assert all(isinstance(e.act, torch.nn.GELU) and e.act.approximate == "none" for e in theirs.embeds)


CASES = [
    ("mim", {}),
    ("mim", {"encoder.variant": "authors"}),
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


def test_the_decoder_stays_channels_last_in_inference_and_gives_the_contiguous_decoders_logits():
    """Channels-last is the faster layout for the decoder in inference too (segmenter.py); a layout must not change
    what the network computes, and loading weights (a model.pt) must not undo it."""
    torch.manual_seed(0)
    cfg = build_config("tiny").encoder
    model = HybridSegmenter(cfg, 32, 3, feature_size=8, decoder="light").eval()
    loaded = HybridSegmenter(cfg, 32, 3, feature_size=8, decoder="light")
    loaded.load_state_dict(model.state_dict())
    loaded.eval()
    decoder_weights = [p for n, p in loaded.named_parameters() if p.dim() == 5 and not n.startswith("encoder.")]
    assert decoder_weights and all(p.is_contiguous(memory_format=torch.channels_last_3d) for p in decoder_weights)
    contiguous = HybridSegmenter(cfg, 32, 3, feature_size=8, decoder="light")
    contiguous.load_state_dict(model.state_dict())
    for part in (contiguous.skips, contiguous.ups, contiguous.out):
        part.to(memory_format=torch.contiguous_format)
    x = torch.rand(2, 1, 32, 32, 32)
    with torch.inference_mode():
        torch.testing.assert_close(loaded(x), contiguous.eval()(x), rtol=1e-4, atol=1e-5)


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
    passes' loss shares add up to the level's losses and the gradients equal those of one pass per level; the
    alignment diagnostics, gathered pass by pass, equal those of one pass and change neither losses nor gradients."""
    torch.manual_seed(0)
    cfg = build_config("tiny", "mim", {"loss.align": align})
    model = build_pretrainer(cfg)
    levels = make_mim_views(torch.rand(1, 1, 64, 64, 64), cfg.mask, model.patch, torch.Generator().manual_seed(0))
    whole: dict[str, float] = {}
    for level in model.level_outputs(levels):
        assert level.diagnostics == {}
        level.total.backward()
        whole.update({k: float(v.detach()) for k, v in level.losses.items()})
    reference = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    one_pass = {k: float(v) for lv in model.level_outputs(levels, diagnostics=True) for k, v in lv.diagnostics.items()}
    assert set(one_pass) == {"align_spread_l12", "align_gap_l12", "align_spread_l23", "align_gap_l23"}
    shares: dict[str, float] = {}
    diagnostics: dict[str, float] = {}
    passes = 0
    for level in model.level_outputs(levels, views_per_pass=views_per_pass, diagnostics=True):
        assert level.pred.shape[0] == level.views.stop - level.views.start <= views_per_pass
        assert all(not v.requires_grad for v in level.diagnostics.values())
        level.total.backward()
        passes += 1
        for k, v in level.losses.items():
            shares[k] = shares.get(k, 0.0) + float(v.detach())
        for k, v in level.diagnostics.items():
            assert k not in diagnostics  # once per level, on its last pass
            diagnostics[k] = float(v)
    assert passes == sum(-(-lv.images.shape[0] // views_per_pass) for lv in levels)
    assert shares.keys() == whole.keys() and all(abs(shares[k] - whole[k]) < 1e-5 for k in whole), (shares, whole)
    assert diagnostics.keys() == one_pass.keys()
    assert all(abs(diagnostics[k] - one_pass[k]) < 1e-5 for k in one_pass), (diagnostics, one_pass)
    for n, p in model.named_parameters():
        assert torch.allclose(p.grad, reference[n], atol=1e-6, rtol=1e-4), n


def _two_level_model(align):
    torch.manual_seed(0)
    cfg = build_config("tiny", "mim", {"loss.align": align, "mask.levels": 2})
    model = build_pretrainer(cfg).eval()
    coarse, middle = make_mim_views(torch.rand(1, 1, 64, 64, 64), cfg.mask, model.patch,
                                    torch.Generator().manual_seed(0))
    candidates = masked_blocks(coarse.mask.mask, coarse.block_of_token, coarse.n_blocks)  # [1, 8]
    tokens = torch.randn(middle.images.shape[0], 4, model.encoder.out_dim)
    return cfg, model, (coarse, middle), candidates, tokens


@pytest.mark.parametrize("align", ["byol", "ce"])
def test_alignment_uses_the_parent_block_the_child_came_from(align):
    """Changing the target of the child's own parent block changes the loss; other blocks do not (byol).
    The authors' L1-L2 byol compared middle features with themselves: there the parent would not matter at all."""
    cfg, model, (_, middle), candidates, tokens = _two_level_model(align)
    targets = torch.randn(1, 8, cfg.loss.align_dim)
    base = model._alignment(0, tokens, targets, candidates, middle)[0]
    own = int(middle.parent_block[0])
    other = next(b for b in range(8) if b not in middle.parent_block.tolist())
    changed_own, changed_other = targets.clone(), targets.clone()
    changed_own[0, own] = torch.randn(cfg.loss.align_dim)
    changed_other[0, other] = torch.randn(cfg.loss.align_dim)
    assert not torch.allclose(model._alignment(0, tokens, changed_own, candidates, middle)[0], base)
    if align == "byol":
        assert torch.allclose(model._alignment(0, tokens, changed_other, candidates, middle)[0], base)
    else:  # a localisation among the parent's masked blocks: the target is the block the child was cut from
        child = model.predictors[0](model.projectors[0](tokens.mean(1)))
        logits = torch.nn.functional.cosine_similarity(child[:, None], targets[middle.parent], dim=-1)
        logits = (logits / cfg.loss.ce_temperature).masked_fill(~candidates[middle.parent], float("-inf"))
        expected = torch.nn.functional.cross_entropy(logits, middle.parent_block)
        assert torch.allclose(base, expected)


def test_targets_are_the_encoders_unmasked_view_of_the_parent_centred_on_its_masked_blocks():
    """The target of a parent block: its encoder tokens with nothing masked, mean-pooled, through the projector,
    minus the mean over the parent's masked blocks, scaled to mean squared norm 1 over them; no gradient (the
    stop-gradient sits after the projector). So a constant child output c scores 1 + |c|^2 on average over the
    blocks it can come from (1: chance), and the targets see the pixels of the masked block the child was cut
    from."""
    cfg, model, (coarse, _), candidates, _ = _two_level_model("byol")
    targets = model._targets(0, coarse, candidates)
    assert targets.shape == (1, 8, cfg.loss.align_dim) and not targets.requires_grad
    with torch.no_grad():
        tokens = model.encoder(coarse.images)  # every token: the parent seen whole
        pooled = torch.stack([tokens[:, coarse.block_of_token == b].mean(1) for b in range(8)], 1)
        projected = model.projectors[0](pooled)
    masked = candidates[0]
    centred = projected - projected[:, masked].mean(1, keepdim=True)
    expected = centred / centred[:, masked].pow(2).sum(-1).mean().sqrt()
    assert torch.allclose(targets, expected, atol=1e-5)
    assert torch.allclose(targets[0, masked].sum(0), torch.zeros(cfg.loss.align_dim), atol=1e-4)
    for constant in torch.randn(5, cfg.loss.align_dim) * torch.rand(5, 1):
        scores = [byol_alignment(constant[None], targets[:, b]) for b in masked.nonzero()[:, 0]]
        assert abs(float(torch.stack(scores).mean()) - (1 + float(constant.pow(2).sum()))) < 1e-3
    block = int(masked.nonzero()[0, 0])  # a masked block: the parent's encoder did not see it, its target does
    voxels = torch.zeros(1, 1, 2, 2, 2, dtype=torch.bool)
    voxels.view(-1)[block] = True
    voxels = voxels.repeat_interleave(16, 2).repeat_interleave(16, 3).repeat_interleave(16, 4)
    changed = coarse.images.clone()
    changed[voxels] = torch.rand(int(voxels.sum()))
    coarse.images = changed
    assert not torch.allclose(model._targets(0, coarse, candidates)[0, block], targets[0, block])


def test_ce_candidates_are_only_the_parents_masked_blocks():
    """A child always comes from a masked block of its parent, so telling masked from visible blocks must gain
    nothing: a child that only does that scores exactly chance, log(#masked); visible blocks do not enter."""
    n_blocks, masked = 8, torch.tensor([2, 3, 4, 6])
    candidates = torch.zeros(1, n_blocks, dtype=torch.bool)
    candidates[0, masked] = True
    feature = torch.nn.functional.normalize(torch.randn(16), dim=0)
    blocks = -feature.repeat(1, n_blocks, 1)  # visible blocks: as unlike the child as can be
    blocks[0, masked] = feature  # masked blocks: all alike, and like the child
    detector = ce_alignment(feature[None], blocks, torch.tensor([3]), 0.2, candidates)
    assert torch.allclose(detector, torch.log(torch.tensor(4.0)))
    unrestricted = ce_alignment(feature[None], blocks, torch.tensor([3]), 0.2, torch.ones_like(candidates))
    assert unrestricted < torch.log(torch.tensor(8.0)) - 0.5  # the shortcut the restriction removes
    # in the model: features of the parent's visible blocks change nothing, those of its masked blocks do
    cfg, model, (_, middle), candidates, tokens = _two_level_model("ce")
    targets = torch.randn(1, 8, cfg.loss.align_dim)
    base = model._alignment(0, tokens, targets, candidates, middle)[0]
    visible = (~candidates[0]).nonzero()[:, 0]
    masked_other = [b for b in candidates[0].nonzero()[:, 0].tolist() if b not in middle.parent_block.tolist()]
    changed = targets.clone()
    changed[0, visible] = torch.randn(len(visible), cfg.loss.align_dim)
    assert torch.allclose(model._alignment(0, tokens, changed, candidates, middle)[0], base)
    changed[0, masked_other[0]] = torch.randn(cfg.loss.align_dim)
    assert not torch.allclose(model._alignment(0, tokens, changed, candidates, middle)[0], base)


def test_spread_and_wrong_block_gap():
    """spread: 0 when every child output points the same way, 1 for orthogonal ones; gap: the loss with the
    parent's other masked blocks minus the loss with the child's own block (visible blocks never count)."""
    same = torch.randn(1, 8).repeat(3, 1) * torch.tensor([[1.0], [2.0], [0.5]])
    assert abs(float(spread(same))) < 1e-6
    assert abs(float(spread(torch.eye(3))) - 1.0) < 1e-6
    pair_loss = torch.tensor([[0.5, 1.0, 9.0, 2.0], [3.0, 1.0, 9.0, 1.0]])
    candidates = torch.tensor([[True, True, False, True], [True, True, False, True]])
    gap = wrong_block_gap(pair_loss, torch.tensor([0, 3]), candidates)
    assert torch.allclose(gap, torch.tensor([1.5 - 0.5, 2.0 - 1.0]))
    lonely = torch.tensor([[True, False, False, False]])  # no other masked block: nothing to compare, gap 0
    assert float(wrong_block_gap(pair_loss[:1], torch.tensor([0]), lonely)[0]) == 0.0


def test_block_pooling_takes_exactly_the_tokens_of_each_block():
    """The parent's block features pool exactly the tokens of each block of the parent."""
    from engine.losses import pool_blocks
    from engine.masking import octant_of_token
    latent = torch.randn(2, 64, 5)
    blocks = octant_of_token(4)
    pooled = pool_blocks(latent, blocks, 8)
    for b in range(8):
        assert torch.allclose(pooled[:, b], latent[:, blocks == b].mean(1), atol=1e-6)


def test_curriculum_ramps_are_the_authors():
    """coarse_to_fine: coarse 2x -> 1x (1 + cos), finest 0 -> 1x (sin), middle constant; all equal at the end."""
    from engine.losses import level_weights
    assert level_weights((1, 1, 1), 3, "coarse_to_fine", 0.0) == pytest.approx([2, 1, 0])
    assert level_weights((1, 1, 1), 3, "coarse_to_fine", 1.0) == pytest.approx([1, 1, 1])
    assert level_weights((1, 1, 1), 3, "coarse_to_fine", 0.5) == pytest.approx([1.7071, 1, 0.7071], abs=1e-4)
    assert level_weights((1, 1, 1), 3, "fine_to_coarse", 0.0) == pytest.approx([0, 1, 2])
    assert level_weights((1, 2, 3), 3, "concurrent", 0.3) == [1, 2, 3]


def test_hybridmim_masked_voxels_differ_from_air():
    """A masked voxel is 0; windowed air is 0 too, so HybridMIM lifts intensities to [0.001, 1] before masking."""
    from engine.models.hybridmim import AIR, lift_air
    air_and_bone = torch.tensor([0.0, 1.0])
    assert lift_air(air_and_bone).tolist() == pytest.approx([AIR, 1.0]) and AIR > 0
