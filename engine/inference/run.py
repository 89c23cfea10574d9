"""Whole-volume inference, nnU-Net-predictor style: settings (`InferenceSettings`), weights (`model.pt` ->
`SegmentationPredictor`) and data (a volume file, a folder of them, or a DICOM series) stay separate.

A volume goes to the model grid (`geometry.to_model_grid`), through MONAI's SlidingWindowInferer with gaussian
blending (optionally flip test-time augmentation), and its class probabilities are resampled back onto the input
image itself, so the labelmap has exactly the input's size, origin, spacing and direction."""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn as nn
from monai.inferers import SlidingWindowInferer

from engine.config.finetune import finetune_config_from_dict
from engine.data.labelled import case_name
from engine.errors import UserError
from engine.imageio.dicom import dicom_series
from engine.imageio.geometry import back_to_input, body_box, image_array, resample_channel, to_model_grid, window
from engine.imageio.labelmap import (
    dicom_seg_path,
    probability_path,
    uncertainty_path,
    write_image_atomic,
    write_labelmap,
)
from engine.imageio.volumes import is_volume_file, read_input
from engine.inference.postprocess import keep_largest_components
from engine.inference.preflight import InferencePreflight, VolumePlan, check_volume, count_windows, dry_run_record
from engine.inference.uncertainty import uncertainty_image
from engine.models.segmenter import segmenter_from_config
from engine.runtime.checkpoint import load_checkpoint
from engine.runtime.device import amp_dtype, autocast, pick_device
from engine.runtime.memory import available_for
from engine.runtime.progress import Progress

log = logging.getLogger(__name__)
TTA_FLIPS = ((), (2,), (3,), (4,))  # identity and one flip per spatial axis of [B, C, X, Y, Z]


@dataclass(frozen=True)
class InferenceSettings:
    overlap: float = 0.5
    sw_batch_size: int = 2
    tta: bool = False
    device: str = "auto"
    amp: str = "auto"
    crop_body: bool = True  # run the window only over the body's bounding box (background elsewhere)
    postprocess: bool = True  # what model.pt chose on validation (its labels' largest connected components)


@dataclass(frozen=True)
class ModelSpec:
    """What model.pt says about using its network: label names -> values (channel order), grid and window."""

    labels: dict[str, int]
    spacing: tuple[float, ...]
    hu_window: tuple[float, ...]
    roi: int
    in_channels: int = 1
    largest_component: tuple[str, ...] = ()  # labels to keep only the largest connected component of

    @property
    def values(self) -> np.ndarray:
        return np.array(sorted(self.labels.values()), dtype=np.int64)

    def channels(self, names) -> list[int]:
        """Channel indices (0 = background) of label names."""
        order = sorted(self.labels, key=self.labels.get)
        return [order.index(name) for name in names]


@dataclass
class GridVolume:
    grid: sitk.Image  # the input on the model grid (nearest-RAS, model spacing)
    volume: np.ndarray  # [X, Y, Z] windowed to [0, 1]
    box: tuple[slice, ...]  # where the sliding window runs (the body's bounding box, or everything)


@dataclass
class Segmentation:
    labelmap: sitk.Image  # label values, on the input grid
    probabilities: dict[str, sitk.Image] | None  # foreground label name -> probability, on the input grid
    uncertainty: sitk.Image | None = None  # normalised entropy of the probabilities (float32, [0, 1]), input grid


def sliding_window_probabilities(model: nn.Module, image: torch.Tensor, roi: int, overlap: float = 0.5,
                                 sw_batch_size: int = 2, amp: torch.dtype | None = None, tta: bool = False,
                                 on_windows: Callable[[int], None] | None = None) -> torch.Tensor:
    """image [1, C, X, Y, Z] -> softmax probabilities [K, X, Y, Z] (float32, CPU), gaussian-blended windows run on
    the model's device. `on_windows(n)` is called after each forward with the number of windows it ran."""
    device = next(model.parameters(), torch.empty(0)).device
    inferer = SlidingWindowInferer(roi_size=(roi,) * 3, sw_batch_size=sw_batch_size, overlap=overlap,
                                   mode="gaussian", sw_device=device, device=torch.device("cpu"))

    def predict(x: torch.Tensor) -> torch.Tensor:  # x: [windows, C, R, R, R]
        with autocast(device, amp):
            probs = torch.softmax(model(x).float(), dim=1)
        if on_windows is not None:
            on_windows(x.shape[0])
        return probs

    model.eval()
    total = None
    with torch.no_grad():
        for axes in TTA_FLIPS if tta else TTA_FLIPS[:1]:
            probs = inferer(image.flip(axes) if axes else image, predict)
            probs = probs.flip(axes) if axes else probs
            total = probs if total is None else total + probs
    return (total / (len(TTA_FLIPS) if tta else 1))[0].float()


class SegmentationPredictor:
    """A network plus its ModelSpec and the InferenceSettings; `predict(image)` -> Segmentation on image's grid."""

    def __init__(self, model: nn.Module, spec: ModelSpec, settings: InferenceSettings = InferenceSettings()):
        self.device = pick_device(settings.device)
        self.amp = amp_dtype(settings.amp, self.device)
        self.model, self.spec, self.settings = model.to(self.device).eval(), spec, settings

    @property
    def passes(self) -> int:
        """Sliding-window passes per volume: one, or one per flip with test-time augmentation."""
        return len(TTA_FLIPS) if self.settings.tta else 1

    @classmethod
    def from_checkpoint(cls, path: str | Path, settings: InferenceSettings = InferenceSettings()):
        ckpt = load_checkpoint(path)
        if ckpt.get("kind") != "segmentation":
            raise UserError(f"{path}: a '{ckpt.get('kind')}' checkpoint; `infer` needs a segmentation model.pt")
        model, spec = segmenter_and_spec(ckpt)
        return cls(model, spec, settings)

    def predict(self, image: sitk.Image, probabilities: bool = False, sw_batch_size: int | None = None,
                uncertainty: bool = False) -> Segmentation:
        return self.predict_on_grid(image, self.model_grid(image), probabilities, sw_batch_size,
                                    uncertainty=uncertainty)

    def model_grid(self, image: sitk.Image) -> GridVolume:
        """The image on the model grid, windowed, and the box the sliding window runs over."""
        grid = to_model_grid(image, self.spec.spacing)
        volume = window(image_array(grid), self.spec.hu_window)  # [X, Y, Z]
        everything = tuple(slice(0, n) for n in volume.shape)
        box = body_box(volume, self.spec.hu_window) if self.settings.crop_body else everything
        return GridVolume(grid, volume, box)

    def predict_on_grid(self, image: sitk.Image, prepared: GridVolume, probabilities: bool = False,
                        sw_batch_size: int | None = None, on_windows: Callable[[int], None] | None = None,
                        uncertainty: bool = False) -> Segmentation:
        """`predict` from the image's `model_grid`; `sw_batch_size` (windows per forward) overrides the settings';
        `on_windows(n)` after each forward of n windows (`windows(prepared)` of them in all); `uncertainty`: also
        the normalised entropy of the (test-time-averaged) probabilities on the input grid."""
        grid, volume, box = prepared.grid, prepared.volume, prepared.box
        probs = np.zeros((len(self.spec.labels), *volume.shape), dtype=np.float32)
        probs[0] = 1.0  # background outside the body box
        probs[(slice(None), *box)] = self._probabilities(volume[box], sw_batch_size, on_windows).numpy()
        index = sitk.GetArrayFromImage(back_to_input(probs, grid, image))
        if self.settings.postprocess and self.spec.largest_component:
            index = keep_largest_components(index, self.spec.channels(self.spec.largest_component))
        labelmap = sitk.GetImageFromArray(self.spec.values[index].astype(_label_dtype(self.spec.values)))
        labelmap.CopyInformation(image)
        return Segmentation(labelmap, self._probability_images(probs, grid, image) if probabilities else None,
                            uncertainty_image(probs, grid, image) if uncertainty else None)

    def windows(self, prepared: GridVolume) -> int:
        """Windows the network runs on for one volume, every test-time flip counted."""
        box_size = tuple(s.stop - s.start for s in prepared.box)
        return count_windows(box_size, self.spec.roi, self.settings.overlap) * self.passes

    def _probabilities(self, volume: np.ndarray, sw_batch_size: int | None = None,
                       on_windows: Callable[[int], None] | None = None) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(volume))[None, None]
        s = self.settings
        return sliding_window_probabilities(self.model, x, self.spec.roi, s.overlap, sw_batch_size or s.sw_batch_size,
                                            self.amp, s.tta, on_windows)

    def _probability_images(self, probs: np.ndarray, grid: sitk.Image, image: sitk.Image) -> dict[str, sitk.Image]:
        names = sorted(self.spec.labels, key=self.spec.labels.get)
        return {name: resample_channel(probs[k], grid, image) for k, name in enumerate(names) if k > 0}


def segmenter_and_spec(ckpt: dict) -> tuple[nn.Module, ModelSpec]:
    """The trained network of a segmentation model.pt (loaded) and what it says about using it."""
    cfg = finetune_config_from_dict(ckpt["config"])
    spec = ModelSpec(dict(ckpt["labels"]), tuple(ckpt["spacing"]), tuple(ckpt["hu_window"]), int(ckpt["roi"]),
                     cfg.encoder.in_channels, tuple(ckpt.get("largest_component", ())))
    model = segmenter_from_config(ckpt["config"], len(spec.labels))
    model.load_state_dict(ckpt["model"])
    return model, spec


def dicom_seg_module():
    """engine.imageio.dicom_seg, once highdicom (an optional dependency) is known to be importable."""
    from engine.imageio import dicom_seg
    dicom_seg._highdicom()
    return dicom_seg


def _label_dtype(values: np.ndarray):
    return np.uint8 if values.max() < 256 else np.uint16


def input_jobs(input_path: str | Path, output: str | Path) -> list[tuple[Path, Path]]:
    """(input, output) pairs: a file or DICOM folder -> one output file; a folder of volumes -> one per volume."""
    input_path, output = Path(input_path), Path(output)
    if input_path.is_dir() and not dicom_series(input_path):
        volumes = sorted(p for p in input_path.iterdir() if p.is_file() and is_volume_file(p))
        if not volumes:
            raise UserError(f"{input_path}: no volumes and no DICOM series in this folder")
        if is_volume_file(output):
            raise UserError(f"--input holds {len(volumes)} volumes: --output must be a folder, not {output.name}")
        if output.resolve() == input_path.resolve():
            raise UserError("--output must differ from the --input folder")
        return [(p, output / f"{case_name(p)}_seg.nii.gz") for p in volumes]
    if not is_volume_file(output):
        output = output / f"{case_name(input_path)}_seg.nii.gz"
    return [(input_path, output)]


@dataclass(frozen=True)
class InferRequest:
    """What `engine infer` is asked to do (the CLI's options, as a Python API)."""

    checkpoint: str  # model.pt of a fine-tuning run
    input: str  # a volume, a DICOM series folder or a folder of volumes
    output: str  # a labelmap file or a folder
    probabilities: bool = False  # also one probability map per label
    uncertainty: bool = False  # also the normalised entropy of the probabilities, <stem>_uncertainty.nii.gz
    dicom_seg: bool = False  # also a DICOM SEG over the source slices, <stem>.dcm (input: a DICOM series folder)
    tta: bool = False
    device: str = "auto"
    overlap: float = 0.5
    progress: str = "bar"
    sw_batch_size: int | None = None  # windows per forward; None: the largest up to 2 that fits in memory
    postprocess: bool = True  # keep the largest connected component of the labels model.pt names
    check_memory: bool = True  # refuse a volume whose estimated peak memory does not fit, before its big buffers


def run_infer(request: InferRequest) -> list[Path]:
    """Segment a volume, a DICOM series or a folder of volumes; returns the labelmaps written."""
    jobs = input_jobs(request.input, request.output)
    if request.dicom_seg:
        check_dicom_seg_input(request.input)
    predictor = _predictor(request)
    preflight = InferencePreflight(predictor) if request.check_memory else None
    reporter = Progress(request.progress, stage="infer", total=len(jobs))
    reporter.start(0, message=f"{len(jobs)} volume(s) on {predictor.device}")
    written = []
    for n, (source, target) in enumerate(jobs, 1):
        t0 = time.perf_counter()
        written.append(_infer_one(predictor, (source, target), request, reporter, preflight))
        reporter.step(n, {"seconds": round(time.perf_counter() - t0, 2)})
    reporter.done(len(jobs), written[0] if len(written) == 1 else Path(request.output),
                  paths=[str(p) for p in written])
    return written


def check_dicom_seg_input(input_path: str | Path) -> None:
    """--dicom-seg needs a DICOM series folder (the SEG references its slices) and highdicom, checked before any
    inference runs."""
    path = Path(input_path)
    if not (path.is_dir() and dicom_series(path)):
        raise UserError(f"--dicom-seg needs a DICOM series folder as --input; {path} is not one")
    dicom_seg_module()


def _predictor(request: InferRequest) -> SegmentationPredictor:
    settings = InferenceSettings(overlap=request.overlap, tta=request.tta, device=request.device,
                                 postprocess=request.postprocess)
    return SegmentationPredictor.from_checkpoint(request.checkpoint, settings)


def _infer_one(predictor: SegmentationPredictor, paths: tuple[Path, Path], request: InferRequest, reporter: Progress,
               preflight: InferencePreflight | None) -> Path:
    (source, target), probabilities, sw_batch_size = paths, request.probabilities, request.sw_batch_size
    available = available_for(predictor.device) if preflight else None  # before this volume takes any memory
    image, dicom = read_input(source)
    if dicom is not None:  # the series, and for an irregular one what was done to it, in one line
        log.warning(dicom.note)
        reporter.event("input", path=str(source), message=dicom.note, geometry=list(dicom.geometry.kinds))
    t0 = time.perf_counter()
    prepared = predictor.model_grid(image)
    if preflight is not None:
        plan = preflight.plan(image, prepared, probabilities, sw_batch_size, available, request.uncertainty)
        check_volume(plan, source.name)
        _report_plan(plan, predictor.settings.sw_batch_size, source, reporter)
        sw_batch_size = plan.tile_batch
    windows = WindowProgress(reporter, source, predictor.windows(prepared))
    result = predictor.predict_on_grid(image, prepared, probabilities, sw_batch_size, windows, request.uncertainty)
    extra = {"source": str(source), "model": str(request.checkpoint), "tta": predictor.settings.tta,
             "seconds": round(time.perf_counter() - t0, 2)}
    if dicom is not None:
        extra["dicom"] = dicom.record()
    if result.probabilities:
        extra["probabilities"] = {}
        for name, prob in result.probabilities.items():
            extra["probabilities"][name] = write_image_atomic(prob, probability_path(target, name)).name
    if result.uncertainty is not None:
        extra["uncertainty"] = write_image_atomic(result.uncertainty, uncertainty_path(target)).name
    labels = {k: v for k, v in predictor.spec.labels.items() if v != 0}
    if request.dicom_seg and dicom is not None:
        seg = dicom_seg_module().write_dicom_seg(result.labelmap, dicom.geometry.files, labels, dicom_seg_path(target))
        extra["dicom_seg"] = seg.name
    return write_labelmap(result.labelmap, target, labels, extra)


class WindowProgress:
    """Progress inside one volume: a `windows` event (done, of `windows`) about every 2% of its windows, so a
    progress bar moves while a large CT is segmented."""

    def __init__(self, reporter: Progress, source: Path, windows: int):
        self.reporter, self.path, self.windows = reporter, str(source), windows
        self.every, self.done, self.reported = max(1, windows // 50), 0, 0

    def __call__(self, n: int) -> None:
        self.done += n
        if self.done - self.reported >= self.every or self.done >= self.windows:
            self.reported = self.done
            self.reporter.event("windows", path=self.path, done=self.done, windows=self.windows)


def _report_plan(plan: VolumePlan, default_batch: int, source: Path, reporter: Progress) -> None:
    if plan.auto_batch and plan.tile_batch < default_batch:
        log.warning("%s: tile batch lowered to %d to fit in memory; %s predicted", source.name, plan.tile_batch,
                    plan.estimate.describe())
    reporter.event("memory", path=str(source), **plan.to_dict())


def dry_run_infer(request: InferRequest) -> list[dict]:
    """What `run_infer` would need, volume by volume, without segmenting or writing anything: the windows, the tile
    batch, the predicted peak memory (the model included) and the predicted time. Each volume is read and brought to
    the model grid, since the body box decides how many windows run."""
    jobs = input_jobs(request.input, request.output)
    predictor = _predictor(request)
    probabilities, sw_batch_size = request.probabilities, request.sw_batch_size
    preflight = InferencePreflight(predictor)
    records = []
    for source, target in jobs:
        available = available_for(predictor.device)
        t0 = time.perf_counter()
        image, _ = read_input(source)
        prepared = predictor.model_grid(image)
        plan = preflight.plan(image, prepared, probabilities, sw_batch_size, available, request.uncertainty)
        plan.seconds = preflight.time(plan, prepared, image, time.perf_counter() - t0)
        records.append(dry_run_record(source, target, plan, preflight.params))
    return records
