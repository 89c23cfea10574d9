"""Masking invariants: exact counts, seeds, spatial blocks, children cut from masked parent regions."""
import pytest
import torch
import torch.nn.functional as F

from engine.config.pretrain import MaskConfig, build_config, masked_count
from engine.masking import (
    block_mask,
    make_mim_views,
    octant_of_token,
    patchify,
    random_mask,
    token_positions,
    unpatchify,
)

CFG = MaskConfig(roi=64, levels=3, ratios=(0.5, 0.6, 0.5), k2=4, k3=4)
PATCH = 16


def views(seed=0, batch=2, cfg=CFG):
    crops = torch.rand(batch, 1, 2 * cfg.roi, 2 * cfg.roi, 2 * cfg.roi, generator=torch.Generator().manual_seed(99))
    return crops, make_mim_views(crops, cfg, PATCH, torch.Generator().manual_seed(seed))


def test_patchify_round_trip_and_token_order():
    x = torch.arange(2 * 32 * 48 * 16, dtype=torch.float32).reshape(2, 1, 32, 48, 16)
    tokens = patchify(x, 16)
    assert tokens.shape == (2, 2 * 3 * 1, 16**3)
    assert torch.equal(unpatchify(tokens, 16, (2, 3, 1)), x)
    # token 1 is the patch at (z=0, y=1, x=0): raster order over the grid
    assert torch.equal(tokens[0, 1], x[0, 0, 0:16, 16:32, 0:16].reshape(-1))


@pytest.mark.parametrize("n,ratio", [(216, 0.6), (64, 0.5), (8, 0.5), (27, 0.75)])
def test_random_mask_exact_count(n, ratio):
    m = random_mask(5, n, ratio, torch.Generator().manual_seed(1))
    assert (m.mask.sum(1) == masked_count(n, ratio)).all()
    assert m.keep.shape == (5, n - masked_count(n, ratio))
    assert not m.mask.gather(1, m.keep).any(), "kept tokens must be visible"
    assert (m.keep.diff(dim=1) > 0).all(), "kept ids ascending"


def test_same_seed_same_masks_other_seed_other_masks():
    _, a = views(seed=3)
    _, b = views(seed=3)
    _, c = views(seed=4)
    for la, lb in zip(a, b):
        assert torch.equal(la.mask.mask, lb.mask.mask) and torch.equal(la.images, lb.images)
    assert any(not torch.equal(la.mask.mask, lc.mask.mask) for la, lc in zip(a, c))


def test_coarse_blocks_are_spatial_cubes_not_raster_runs():
    grid = 6
    blocks = octant_of_token(grid)
    pos = token_positions(grid)
    for b in range(8):
        cube = pos[blocks == b]
        assert len(cube) == 27
        span = cube.max(0).values - cube.min(0).values
        assert span.tolist() == [2, 2, 2], "each block is a 3x3x3 cube of the token grid"
    mask, order = block_mask(4, blocks, 8, 0.5, torch.Generator().manual_seed(0))
    assert (mask.mask.sum(1) == 4 * 27).all()
    for v in range(4):
        masked_blocks = set(blocks[mask.mask[v]].tolist())
        assert masked_blocks == set(order[v, :4].tolist())


def test_view_counts_shapes_and_passes():
    crops, levels = views(batch=2)
    assert [lv.images.shape[0] for lv in levels] == [2, 8, 32]
    assert all(lv.images.shape[1:] == (1, 64, 64, 64) for lv in levels)
    assert CFG.passes_per_sample() == 21
    assert [lv.mask.mask.sum(1).unique().tolist() for lv in levels] == [[32], [masked_count(64, 0.6)], [32]]


def test_middle_views_are_masked_octants_of_their_parent():
    crops, (coarse, middle, _) = views()
    r = CFG.roi
    for v in range(middle.images.shape[0]):
        parent, block = int(middle.parent[v]), int(middle.parent_block[v])
        # the parent masked every token of the block the child was cut from
        assert coarse.mask.mask[parent][coarse.block_of_token == block].all()
        z, y, x = (int(c) for c in middle.box[v, 0])
        assert torch.equal(middle.images[v], crops[parent, :, z:z + r, y:y + r, x:x + r])
        s, e = middle.box_in_parent[v]
        assert ((e - s) == r // 2).all() and (s == torch.tensor([z, y, x]) // 2).all()
        # the coarse view is the crop at half resolution: its block holds the child, averaged 2x2x2
        coarse_block = coarse.images[parent, :, s[0]:e[0], s[1]:e[1], s[2]:e[2]]
        assert torch.allclose(coarse_block, F.avg_pool3d(middle.images[v:v + 1], 2)[0], atol=1e-5)


def test_fine_views_come_from_masked_middle_patches():
    _, (_, middle, fine) = views()
    r = CFG.roi
    for v in range(fine.images.shape[0]):
        parent, token = int(fine.parent[v]), int(fine.parent_block[v])
        assert middle.mask.mask[parent, token], "a fine view is cut from a patch its middle view masked"
        s, e = fine.box_in_parent[v]
        assert ((e - s) == PATCH).all()
        assert (s // PATCH == token_positions(r // PATCH)[token]).all()
        source = middle.images[parent:parent + 1, :, s[0]:e[0], s[1]:e[1], s[2]:e[2]]
        assert torch.equal(F.interpolate(source, size=(r,) * 3, mode="trilinear", align_corners=False)[0], fine.images[v])
        # and its box in crop coordinates lies inside its parent's box
        pb, cb = middle.box[parent], fine.box[v]
        assert (cb[0] >= pb[0]).all() and (cb[0] + cb[1] <= pb[0] + pb[1]).all()
        assert torch.allclose(cb[0], pb[0] + s.float())


def test_children_are_distinct_blocks_of_their_parent():
    _, (_, middle, fine) = views()
    for level, k in ((middle, CFG.k2), (fine, CFG.k3)):
        pairs = torch.stack([level.parent, level.parent_block], 1)
        assert len({tuple(p.tolist()) for p in pairs}) == len(pairs)
        assert (torch.bincount(level.parent) == k).all()


def test_two_levels_and_single_level():
    cfg2 = MaskConfig(roi=32, levels=2, ratios=(0.5, 0.5), k2=3, k3=1)
    crops = torch.rand(1, 1, 64, 64, 64)
    levels = make_mim_views(crops, cfg2, PATCH, torch.Generator().manual_seed(0))
    assert [lv.images.shape[0] for lv in levels] == [1, 3]
    cfg1 = MaskConfig(roi=32, levels=1, ratios=(0.5, 0.75))
    (single,) = make_mim_views(torch.rand(2, 1, 32, 32, 32), cfg1, PATCH, torch.Generator().manual_seed(0))
    assert single.parent is None and (single.mask.mask.sum(1) == masked_count(8, 0.75)).all()


def test_config_rejects_impossible_choices_with_a_reason():
    from engine.errors import UserError
    with pytest.raises(UserError, match="k2=5"):
        build_config("tiny", "mim", {"mask.k2": 5})
    with pytest.raises(UserError, match="Did you mean 'mask.ratios'"):
        build_config("tiny", "mim", {"mask.ratio": 0.5})
    with pytest.raises(UserError, match="Did you mean 'small'"):
        build_config("smal", "mim")
    with pytest.raises(UserError, match="Did you mean 'hybridmim'"):
        build_config("tiny", "hybrdmim")
