"""CLI end to end on the tiny preset with real CT: pretrain -> resume -> reconstruct, geometry checked against
the source; progress JSON; one-line errors for user mistakes."""
import json

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch
import yaml
from engine_testing import run_engine


def test_pretrain_writes_run_folder_and_json_progress(tiny_pretrain_run):
    assert {p.name for p in tiny_pretrain_run.iterdir()} >= {"checkpoint.pt", "config.yaml", "log.jsonl"}
    log = [json.loads(line) for line in (tiny_pretrain_run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2]
    assert {"rec_l1", "rec_l2", "rec_l3", "align_l12", "align_l23"} <= set(log[0])
    # alignment diagnostics (no gradient): spread of the child outputs, gap to a wrong parent block
    assert {"align_spread_l12", "align_spread_l23", "align_gap_l12", "align_gap_l23"} <= set(log[0])
    ckpt = torch.load(tiny_pretrain_run / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 2 and ckpt["config"]["method"] == "mim" and ckpt["kind"] == "pretrain"
    assert any(k.startswith("encoder.") for k in ckpt["model"])


def test_resume_continues_to_the_requested_step(tiny_pretrain_run, ct_dir, tmp_path):
    import shutil
    run = tmp_path / "run"
    shutil.copytree(tiny_pretrain_run, run)
    result = run_engine("pretrain", "--data", str(ct_dir), "--preset", "tiny", "--steps", "3", "--out", str(run),
                        "--resume", "--progress", "json")
    events = [json.loads(line) for line in result.stdout.splitlines()]
    assert events[0]["event"] == "start" and events[0]["step"] == 2
    assert [e["step"] for e in events if e["event"] == "step"] == [3]
    step = next(e for e in events if e["event"] == "step")
    assert {"align_l12", "align_spread_l12", "align_gap_l12", "align_spread_l23", "align_gap_l23"} <= set(step["losses"])
    assert events[-1]["event"] == "done" and events[-1]["path"].endswith("checkpoint.pt")
    assert torch.load(run / "checkpoint.pt", weights_only=True)["step"] == 3
    assert len((run / "log.jsonl").read_text().splitlines()) == 3


def test_starting_over_an_existing_run_is_refused(tiny_pretrain_run, ct_dir):
    result = run_engine("pretrain", "--data", str(ct_dir), "--out", str(tiny_pretrain_run), check=False)
    assert result.returncode == 2 and "--resume" in result.stderr


@pytest.fixture(scope="module")
def reconstruction(tiny_pretrain_run, ct_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("recon")
    run_engine("reconstruct", "--checkpoint", str(tiny_pretrain_run / "checkpoint.pt"),
               "--image", str(ct_dir / "abdomen_ct.nii.gz"), "--out", str(out), "--progress", "none")
    return out, json.loads((out / "index.json").read_text())


def test_reconstruct_lists_every_level_and_view(reconstruction):
    out, index = reconstruction
    assert [lv["name"] for lv in index["levels"]] == ["coarse", "middle", "fine"]
    assert [len(lv["views"]) for lv in index["levels"]] == [1, 2, 4]  # tiny: k2 = k3 = 2
    for level in index["levels"]:
        for view in level["views"]:
            for kind in ("input", "masked", "reconstruction", "error", "mask"):
                assert (out / view["files"][kind]).is_file()
    assert (out / index["montage"]).stat().st_size > 10_000


def _world_points(path, ijk):
    img = nib.load(str(path))
    return nib.affines.apply_affine(img.affine, ijk), np.asarray(img.dataobj)


def test_views_sit_inside_their_parents_masked_blocks_in_world_space(reconstruction):
    out, index = reconstruction
    levels = index["levels"]
    for parent_level, child_level in zip(levels, levels[1:]):
        for child in child_level["views"]:
            parent = parent_level["views"][child["parent"]]
            lo, hi = np.array(child["box_world"]["min"]), np.array(child["box_world"]["max"])
            plo, phi = np.array(parent["box_world"]["min"]), np.array(parent["box_world"]["max"])
            assert (lo >= plo - 1e-3).all() and (hi <= phi + 1e-3).all()
            # the child's centre, mapped into the parent's mask volume, falls on a masked voxel
            mask = nib.load(str(out / parent["files"]["mask"]))
            centre_ijk = nib.affines.apply_affine(np.linalg.inv(mask.affine), (lo + hi) / 2)
            assert np.asarray(mask.dataobj)[tuple(np.round(centre_ijk).astype(int))] == 1


def test_view_voxels_match_the_source_ct_at_their_world_positions(reconstruction, ct_dir):
    """Sample the source CT with SimpleITK at every middle view's voxel centres: same HU as the view's input."""
    out, index = reconstruction
    source = sitk.ReadImage(str(ct_dir / "abdomen_ct.nii.gz"), sitk.sitkFloat32)
    for view in index["levels"][1]["views"]:
        img = nib.load(str(out / view["files"]["input"]))
        data = np.asarray(img.dataobj, dtype=np.float32)
        ijk = np.stack(np.meshgrid(*[np.arange(2, s - 2, 4) for s in data.shape], indexing="ij"), -1).reshape(-1, 3)
        ras = nib.affines.apply_affine(img.affine, ijk)
        inside, expected = [], []
        for (i, j, k), (r, a, s) in zip(ijk, ras):
            idx = source.TransformPhysicalPointToContinuousIndex((-r, -a, s))  # RAS -> LPS
            if all(1 <= c <= n - 2 for c, n in zip(idx, source.GetSize())):
                inside.append(data[i, j, k])
                expected.append(_linear(source, idx))
        assert len(inside) > 40
        inside, expected = np.array(inside), np.clip(np.array(expected), -1000, 1000)
        # the view was resampled to 3 mm by MONAI; the reference is interpolated directly from the 2 mm source
        assert np.median(np.abs(inside - expected)) < 60, np.median(np.abs(inside - expected))


def _linear(image, idx):
    return image.EvaluateAtContinuousIndex(idx, sitk.sitkLinear)


def test_user_mistakes_get_one_line_and_exit_2(tmp_path, ct_dir):
    cases = [
        (["pretrain", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o1")], "no such file"),
        (["pretrain", "--data", str(ct_dir), "--preset", "tinny", "--out", str(tmp_path / "o2")], "Did you mean 'tiny'"),
        (["pretrain", "--data", str(ct_dir), "--method", "maee", "--out", str(tmp_path / "o3")], "Did you mean 'mae'"),
        (["pretrain", "--data", str(ct_dir), "--set", "train.steps=abc", "--out", str(tmp_path / "o4")],
         "setting 'train.steps' expects an integer, got 'abc'"),
        (["pretrain", "--data", str(ct_dir), "--set", "train.lr=[5e-4]", "--out", str(tmp_path / "o5")],
         "setting 'train.lr' expects a number, got [0.0005]"),
        (["reconstruct", "--checkpoint", str(tmp_path / "none.pt"), "--image", "x.nii.gz", "--out", str(tmp_path)],
         "no such checkpoint"),
    ]
    for args, expected in cases:
        result = run_engine(*args, check=False)
        assert result.returncode == 2, result.stderr
        lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert len(lines) == 1 and expected in lines[0], result.stderr
        assert "Traceback" not in result.stderr


def test_set_values_reach_training_with_their_types(ct_dir, tmp_path):
    """The README's `--set train.lr=5e-4` is a number (YAML 1.1 would read a string), and `--set train.amp=off`,
    the NaN guard's advice, is the word off (YAML 1.1 would read False)."""
    run = tmp_path / "run"
    run_engine("pretrain", "--data", str(ct_dir), "--preset", "tiny", "--steps", "1", "--out", str(run),
               "--set", "train.lr=5e-4", "--set", "train.amp=off", "--progress", "none")
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["train"]["lr"] == 5e-4 and isinstance(saved["train"]["lr"], float)
    assert saved["train"]["amp"] == "off"
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    assert ckpt["config"]["train"]["lr"] == 5e-4 and ckpt["config"]["train"]["amp"] == "off"
    assert all(group["lr"] == pytest.approx(5e-4) for group in ckpt["optimizer"]["param_groups"])  # tiny: 1 warm-up step
    assert json.loads((run / "log.jsonl").read_text().splitlines()[0])["lr"] == pytest.approx(5e-4)


def test_the_montage_follows_the_child_with_the_most_body():
    """A parent's first child may be cut from air or padding at the crop's edge; the montage's chain takes the child
    of each picked view with the most voxels above the body level (here the second), not simply the first."""
    import torch
    from engine.masking import LevelViews, TokenMask
    from engine.pretraining.montage import chain

    def level(images, parent=None):
        n = images.shape[0]
        mask = TokenMask(torch.zeros(n, 1, dtype=torch.bool), torch.zeros(n, 0, dtype=torch.long),
                         torch.zeros(n, 1, dtype=torch.long))
        return LevelViews(0, images, mask, torch.zeros(n, 2, 3), torch.zeros(1, dtype=torch.long), 1,
                          parent=None if parent is None else torch.tensor(parent))

    coarse = level(torch.full((1, 1, 4, 4, 4), 0.5))
    middle = torch.zeros(3, 1, 4, 4, 4)
    middle[1, :, :2] = 0.5  # half body
    middle[2] = 0.5  # all body, but the child of another parent
    fine = torch.zeros(3, 1, 4, 4, 4)
    fine[2] = 0.5
    levels = [coarse, level(middle, [0, 0, 1]), level(fine, [0, 1, 1])]
    assert chain(levels) == [0, 0, 0]  # the first child at each level
    assert chain(levels, body_level=0.25) == [0, 1, 2]
