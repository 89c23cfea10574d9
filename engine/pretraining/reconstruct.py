"""What a pre-trained MiM/MAE model sees and rebuilds, level by level, placed where it came from.

For one crop of a CT, every level's views are written as NIfTI volumes (input, masked input, reconstruction,
absolute error, mask) whose affines put them at their true position in the source's physical (RAS) space, so a
fine view sits inside the masked block of its middle view, which sits inside the coarse view. An index.json lists
the views with their parents and world boxes; montage.png shows one parent->child chain a person can read."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from engine.config.pretrain import PretrainConfig, config_from_dict
from engine.errors import UserError
from engine.imageio.volumes import write_nifti
from engine.losses import patch_statistics
from engine.masking import LevelViews, make_mim_views, patchify, unpatchify
from engine.models import build_pretrainer
from engine.pretraining.data import preprocess_transforms
from engine.pretraining.montage import write_montage
from engine.runtime.atomic import write_json
from engine.runtime.checkpoint import load_checkpoint, unwrap
from engine.runtime.device import pick_device
from engine.runtime.progress import Progress

FORMAT = "mimslicer-reconstruction/1"
LEVEL_NAMES = {1: ["single"], 2: ["coarse", "middle"], 3: ["coarse", "middle", "fine"]}


def run_reconstruct(checkpoint: str, image: str, out: str, seed: int = 0, center=None, device: str = "auto",
                    progress: str = "bar") -> dict:
    cfg, model = _load_model(checkpoint, pick_device(device))
    reporter = Progress(progress, stage="reconstruct", total=cfg.mask.levels + 1)  # one step per level, then files
    reporter.start()
    crop, crop_affine = _load_crop(image, cfg, center)
    levels = make_mim_views(crop[None].to(next(model.parameters()).device), cfg.mask, model.patch,
                            torch.Generator().manual_seed(seed))
    results = _reconstruct_levels(model, levels, cfg, reporter)
    out_dir = Path(out)
    index = {"format": FORMAT, "source": str(Path(image).resolve()), "checkpoint": str(Path(checkpoint).resolve()),
             "method": cfg.method, "seed": seed}
    index = _write_outputs(out_dir, index, cfg, (crop, crop_affine), levels, results)
    index["montage"] = write_montage(out_dir / "montage.png", levels, results, cfg.data.hu_window,
                                     LEVEL_NAMES[cfg.mask.levels]).name
    write_json(index, out_dir / "index.json")
    reporter.done(cfg.mask.levels + 1, out_dir / "index.json")
    return index


def _load_model(checkpoint: str, device: torch.device):
    ckpt = load_checkpoint(checkpoint)
    if ckpt.get("kind") != "pretrain":
        raise UserError(f"{checkpoint}: reconstruct needs a pre-training checkpoint, this one is '{ckpt.get('kind')}'")
    cfg: PretrainConfig = config_from_dict(ckpt["config"]).validate()
    if cfg.method == "hybridmim":
        raise UserError(f"{checkpoint}: reconstruct shows MiM/MAE levels; HybridMIM has no masked levels to show")
    model = build_pretrainer(cfg)
    model.load_state_dict(ckpt["model"])
    return cfg, model.to(device).eval()


def _load_crop(image: str, cfg: PretrainConfig, center) -> tuple[torch.Tensor, np.ndarray]:
    """The windowed [0, 1] crop [1, S, S, S] (S = 2R for MiM) and its voxel -> RAS affine."""
    from monai.transforms import Compose
    item = Compose(preprocess_transforms(cfg.data))({"image": image})["image"]
    affine = np.asarray(item.affine, dtype=np.float64)
    arr = item.as_tensor().float()  # [1, X, Y, Z]
    size = cfg.crop_size
    if center is None:
        middle = (np.array(arr.shape[1:]) - 1) / 2.0
    else:
        middle = (np.linalg.inv(affine) @ np.array([*center, 1.0]))[:3]
    start = np.round(middle - (size - 1) / 2.0).astype(int)
    crop = torch.zeros(1, size, size, size)
    src = [slice(max(s, 0), min(s + size, n)) for s, n in zip(start, arr.shape[1:])]
    if any(sl.stop <= sl.start for sl in src):
        raise UserError(f"--center {center} lies outside {image}")
    dst = [slice(sl.start - s, sl.stop - s) for sl, s in zip(src, start)]
    crop[(slice(None), *dst)] = arr[(slice(None), *src)]
    shift = np.eye(4)
    shift[:3, 3] = start
    return crop, affine @ shift


@torch.no_grad()
def _reconstruct_levels(model, levels: list[LevelViews], cfg: PretrainConfig, reporter: Progress) -> list[dict]:
    """Per level: reconstruction (visible voxels kept, masked ones predicted) and per-view loss, in [0, 1]."""
    model = unwrap(model)
    p = model.patch
    out = []
    for level in model.level_outputs(levels):
        views = levels[level.level - 1]
        target = patchify(views.images, p)
        pred = level.pred.float()
        if cfg.loss.norm_pix:  # back to intensities with each patch's own statistics (MAE's visualisation)
            mean, std = patch_statistics(target)
            pred, norm_target = pred * std + mean, (target - mean) / std
        else:
            norm_target = target
        m = views.mask.mask[..., None]
        grid = (model.grid,) * 3
        recon = unpatchify(torch.where(m, pred.clamp(0, 1), target), p, grid)
        masked = unpatchify(torch.where(m, torch.zeros_like(target), target), p, grid)
        per_view = ((level.pred.float() - norm_target).pow(2).mean(-1) * m[..., 0]).sum(1) / m[..., 0].sum(1)
        voxel_mask = unpatchify(m.float().expand_as(target), p, grid)
        out.append({"reconstruction": recon.cpu(), "masked": masked.cpu(), "mask": voxel_mask.cpu(),
                    "loss": per_view.cpu(), "level_loss": float(level.losses[f"rec_l{level.level}"])})
        reporter.step(level.level, {f"rec_l{level.level}": out[-1]["level_loss"]})
    return out


def _write_outputs(out_dir: Path, index: dict, cfg, crop_and_affine, levels, results) -> dict:
    """The crop and every view's files, in HU; `index` (what was reconstructed) gets their names and the losses."""
    crop, crop_affine = crop_and_affine
    lo, hi = cfg.data.hu_window
    to_hu = lambda x: np.rint(x.numpy() * (hi - lo) + lo).astype(np.int16)  # noqa: E731
    write_nifti(to_hu(crop[0]), crop_affine, out_dir / "crop.nii.gz")
    names = LEVEL_NAMES[cfg.mask.levels]
    index = {**index, "hu_window": [lo, hi],
             "crop": {"file": "crop.nii.gz", "box_world": _world_box(crop_affine, np.zeros(3), np.full(3, crop.shape[-1]))},
             "levels": []}
    for views, res, name in zip(levels, results, names):
        entries = []
        for v in range(views.images.shape[0]):
            entries.append(_write_view(out_dir, views, res, v, crop_affine, to_hu))
        index["levels"].append({"level": views.level, "name": name, "roi": cfg.mask.roi,
                                "mask_ratio": float(views.mask.mask.float().mean()), "loss": res["level_loss"],
                                "views": entries})
    return index


def _write_view(out_dir: Path, views: LevelViews, res: dict, v: int, crop_affine, to_hu) -> dict:
    vid = f"L{views.level}_V{v}"
    start, size = views.box[v, 0].numpy().astype(np.float64), views.box[v, 1].numpy().astype(np.float64)
    affine = crop_affine @ view_to_crop(start, size, views.images.shape[-1])
    image = views.images[v, 0].cpu()
    recon = res["reconstruction"][v, 0]
    volumes = {
        "input": to_hu(image), "masked": to_hu(res["masked"][v, 0]), "reconstruction": to_hu(recon),
        "error": np.abs(to_hu(recon).astype(np.int32) - to_hu(image)).astype(np.int16),
        "mask": res["mask"][v, 0].numpy().astype(np.uint8),
    }
    files = {}
    for kind, arr in volumes.items():
        files[kind] = write_nifti(arr, affine, out_dir / f"{vid}_{kind}.nii.gz").name
    in_parent = None
    if views.box_in_parent is not None:
        bp = views.box_in_parent[v].tolist()
        in_parent = {"start": bp[0], "stop": bp[1]}
    return {"id": vid, "index": v, "parent": None if views.parent is None else int(views.parent[v]),
            "parent_block": None if views.parent_block is None else int(views.parent_block[v]),
            "box_world": _world_box(crop_affine, start, size), "box_in_parent_voxels": in_parent,
            "masked_fraction": float(views.mask.mask[v].float().mean()), "loss": float(res["loss"][v]),
            "files": files}


def view_to_crop(start: np.ndarray, size: np.ndarray, roi: int) -> np.ndarray:
    """4x4 map from a view's voxel index to crop voxel coordinates (voxel centres, trilinear resampling)."""
    scale = size / roi
    m = np.eye(4)
    m[:3, :3] = np.diag(scale)
    m[:3, 3] = start + 0.5 * scale - 0.5
    return m


def _world_box(crop_affine: np.ndarray, start: np.ndarray, size: np.ndarray) -> dict:
    """RAS bounds of the voxel-corner extent [start - 0.5, start + size - 0.5] of crop voxel coordinates."""
    lo, hi = start - 0.5, start + size - 0.5
    corners = np.array([[x, y, z, 1.0] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
    world = (crop_affine @ corners.T).T[:, :3]
    return {"min": world.min(0).round(4).tolist(), "max": world.max(0).round(4).tolist()}
