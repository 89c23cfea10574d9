"""The default sample CTs: real volumes with organ masks that TotalSegmentator 2.18.0 ships in its source
distribution on PyPI (tests/reference_files/, Apache-2.0). Fetched with pip from the package registry, extracted
member by member (no archive paths are trusted), with their provenance and checksums recorded."""
from __future__ import annotations

import ast
import hashlib
import json
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from engine.errors import UserError
from engine.runtime.atomic import write_json

PACKAGE = "TotalSegmentator==2.18.0"
ROOT = "totalsegmentator-2.18.0/"
# our name -> member of the sdist
FILES = {
    "abdomen_ct.nii.gz": "tests/reference_files/example_ct_sm.nii.gz",  # 30 slices at 3 mm, with its labels
    "abdomen_label.nii.gz": "tests/reference_files/example_seg.nii.gz",
    "abdomen_full_ct.nii.gz": "tests/reference_files/example_ct.nii.gz",  # the whole abdomen, no labels
    "chest_ct.nii.gz": "tests/reference_files/aorta_report/example_ct.nii.gz",
    "dicom_label.nii.gz": "tests/reference_files/example_seg_dicom.nii.gz",
    "LICENSE.TotalSegmentator": "LICENSE",
}
DICOM_MEMBERS = "tests/reference_files/example_ct_dicom/"  # a 20-slice DICOM series of another patient
DICOM_DIR = "dicom_ct"
# the organs of the demo's fine-tuning (TotalSegmentator values): the liver, which one labelled case teaches within
# the demo's minutes (Dice 0.87 on the other patient's DICOM series after 4 minutes from scratch). The spleen, stomach
# and aorta of the same case stayed at Dice 0 even on that case after 400 steps (lr 1e-3 or 3e-3): small structures
# need more than a few minutes and one case.
ORGANS = {"liver": 5}
PSEUDO = "TotalSegmentator model output (pseudo-label), 117-class 'total' map"
CASES = [
    {"case": "abdomen", "image": "abdomen_ct.nii.gz", "label": "abdomen_label.nii.gz", "label_kind": PSEUDO},
    {"case": "abdomen_full", "image": "abdomen_full_ct.nii.gz", "label": None, "label_kind": "none"},
    {"case": "chest", "image": "chest_ct.nii.gz", "label": None, "label_kind": "none"},
    {"case": "dicom", "image": DICOM_DIR, "label": "dicom_label.nii.gz", "label_kind": PSEUDO},
]
CLASS_MAP_MEMBER = "totalsegmentator/map_to_binary.py"
# the abdomen case with the structures of its 117-class map that have a standard name and code (imageio/terminology.py:
# liver, spleen, kidneys, stomach, ...), renumbered 1..n; what the 3D Slicer module's sample loads
NAMED_IMAGE, NAMED_LABELMAP, NAMED_LABELS = "abdomen_ct.nii.gz", "abdomen_structures.nii.gz", "abdomen_structures.json"


def fetch_sample_data(out: str | Path, sdist: str | Path | None = None) -> list[dict]:
    """Write the sample CTs, labels, dataset.json and provenance.json to `out`; returns the cases."""
    out = Path(out)
    provenance = out / "provenance.json"
    if provenance.exists() and all((out / name).exists() for name in [*FILES, DICOM_DIR]):
        record = json.loads(provenance.read_text())
        if not all((out / name).exists() for name in _organ_files()) or \
                json.loads((out / "organs.json").read_text())["labels"] != _organ_labels():  # an older demo's organs
            _write_organ_subset(out)
        if not (out / NAMED_LABELS).exists():  # fetched before the named structures were written
            _write_named_structures(out, record["labels"])
        return record["cases"]
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        archive = Path(sdist) if sdist else _download(Path(tmp))
        checksums, labels = _extract(archive, out)
    cases = [dict(c, image=str(out / c["image"]), label=str(out / c["label"]) if c["label"] else None) for c in CASES]
    record = {"source": f"PyPI {PACKAGE} source distribution, {ROOT}tests/reference_files/",
              "licence": "Apache-2.0 (TotalSegmentator package; see LICENSE.TotalSegmentator)",
              "files": {name: {"member": FILES.get(name, DICOM_MEMBERS + Path(name).name), "sha256": digest}
                        for name, digest in checksums.items()},
              "labels": labels, "cases": cases}
    _write_dataset_json(out, labels)
    _write_organ_subset(out)
    _write_named_structures(out, labels)
    write_json(record, provenance)
    return cases


def _download(tmp: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", PACKAGE, "--no-deps", "--no-binary", ":all:", "-d", str(tmp), "-q"]
    result = subprocess.run(cmd, capture_output=True, text=True)
    archives = list(tmp.glob("*.tar.gz"))
    if result.returncode != 0 or not archives:
        reason = (result.stderr.strip().splitlines() or ["no archive"])[-1]
        raise UserError(f"could not download {PACKAGE} from the package index ({reason}); "
                        "download it elsewhere and pass --sdist totalsegmentator-2.18.0.tar.gz")
    return archives[0]


def _extract(archive: Path, out: Path) -> tuple[dict, dict]:
    if not archive.is_file():
        raise UserError(f"{archive}: no such file")
    checksums = {}
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for name, member in FILES.items():
                checksums[name] = _copy_member(tar, ROOT + member, out / name)
            dicom = [m for m in tar.getmembers() if m.isfile() and m.name.startswith(ROOT + DICOM_MEMBERS)]
            (out / DICOM_DIR).mkdir(exist_ok=True)
            for member in dicom:
                name = Path(member.name).name  # never trust the archive's paths
                checksums[f"{DICOM_DIR}/{name}"] = _copy_member(tar, member.name, out / DICOM_DIR / name)
            labels = _class_map(tar.extractfile(ROOT + CLASS_MAP_MEMBER).read().decode())
    except (tarfile.TarError, KeyError, OSError) as err:
        raise UserError(f"{archive}: not the expected TotalSegmentator 2.18.0 source archive ({err})") from None
    return checksums, labels


def _copy_member(tar: tarfile.TarFile, member: str, target: Path) -> str:
    source = tar.extractfile(member)
    if source is None:
        raise KeyError(member)
    digest = hashlib.sha256()
    tmp = target.with_name("." + target.name + ".part")
    with open(tmp, "wb") as f:
        for chunk in iter(lambda: source.read(1 << 20), b""):
            digest.update(chunk)
            f.write(chunk)
    tmp.replace(target)
    return digest.hexdigest()


def _class_map(source: str) -> dict[str, int]:
    """The 'total' class map literal of TotalSegmentator's map_to_binary.py, read without executing it."""
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "class_map":
            tree = ast.literal_eval(node.value)
            return {"background": 0, **{name: int(value) for value, name in sorted(tree["total"].items())}}
    raise KeyError("class_map")


def _write_dataset_json(out: Path, labels: dict[str, int]) -> None:
    """dataset.json: the volumes for pre-training (labels are never read there)."""
    dataset = {"name": "TotalSegmentator 2.18.0 sample CTs", "labels": labels, "channel_names": {"0": "CT"},
               "training": [{"image": c["image"]} for c in CASES if not c["image"].endswith("/") and c["case"] != "dicom"]}
    write_json(dataset, out / "dataset.json")


def _organ_labels() -> dict[str, int]:
    return {"background": 0, **{name: i for i, name in enumerate(ORGANS, start=1)}}


def _organ_files() -> list[str]:
    return ["organs.json", "abdomen_organs.nii.gz", "dicom_organs.nii.gz"]


def _write_organ_subset(out: Path) -> None:
    """organs.json: fine-tune on the abdomen case's ORGANS; test on the DICOM case."""
    import numpy as np
    import SimpleITK as sitk
    lut = np.zeros(256, np.uint8)
    for new, old in enumerate(ORGANS.values(), start=1):
        lut[old] = new
    from engine.imageio.volumes import read_input
    grids = {"abdomen": sitk.ReadImage(str(out / "abdomen_ct.nii.gz")), "dicom": read_input(out / DICOM_DIR)[0]}
    for case, grid in grids.items():
        label = sitk.ReadImage(str(out / f"{case}_label.nii.gz"))
        organs = sitk.GetImageFromArray(lut[sitk.GetArrayViewFromImage(label).astype(np.uint8)])
        organs.CopyInformation(label)
        # the DICOM case's labelmap stores the same voxels with its j axis flipped: put it on the CT's own grid
        organs = sitk.Resample(organs, grid, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
        sitk.WriteImage(organs, str(out / f"{case}_organs.nii.gz"), True)
    dataset = {"name": "sample CT organs (TotalSegmentator pseudo-labels)",
               "labels": _organ_labels(),
               "channel_names": {"0": "CT"},
               "training": [{"image": "abdomen_ct.nii.gz", "label": "abdomen_organs.nii.gz"}],
               "test": [{"image": DICOM_DIR, "label": "dicom_organs.nii.gz"}]}
    write_json(dataset, out / "organs.json")


def _write_named_structures(out: Path, labels: dict[str, int]) -> None:
    """NAMED_LABELMAP and NAMED_LABELS: the abdomen case's structures that the terminology table knows and that are in
    the labelmap, in the class map's order, named as the table writes them ('kidney_left' -> 'left kidney')."""
    import numpy as np
    import SimpleITK as sitk

    from engine.imageio.terminology import look_up, normalise_name
    label = sitk.ReadImage(str(out / "abdomen_label.nii.gz"))
    array = sitk.GetArrayViewFromImage(label)
    present = set(np.unique(array).tolist())
    kept = [(name, value) for name, value in labels.items() if value in present and value and look_up(name)]
    lut = np.zeros(max(labels.values()) + 1, np.uint8)
    for new, (_, old) in enumerate(kept, start=1):
        lut[old] = new
    named = sitk.GetImageFromArray(lut[array.astype(np.int64)])
    named.CopyInformation(label)
    sitk.WriteImage(named, str(out / NAMED_LABELMAP), True)
    write_json({"image": NAMED_IMAGE, "label": NAMED_LABELMAP,
                "labels": {normalise_name(name): new for new, (name, _) in enumerate(kept, start=1)},
                "totalsegmentator_names": {normalise_name(name): name for name, _ in kept},
                "source": f"PyPI {PACKAGE} source distribution, {ROOT}{FILES['abdomen_ct.nii.gz']} and "
                          f"{FILES['abdomen_label.nii.gz']}",
                "licence": "Apache-2.0 (TotalSegmentator package; see LICENSE.TotalSegmentator)",
                "label_kind": PSEUDO + f", restricted to the {len(kept)} structures with a standard terminology entry"},
               out / NAMED_LABELS)
