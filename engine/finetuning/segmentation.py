"""The segmentation task of fine-tuning: network, batches, DiceCE step, sliding-window validation (mean Dice per
label, and which labels gain from keeping their largest connected component, and a middle slice of the first
validation cases for TensorBoard), and what model.pt must carry to be used without this code (labels, spacing,
window, ROI, post-processing)."""
from __future__ import annotations

import math
from typing import Iterator

import numpy as np
import torch
import torch.nn as nn
from monai.losses import DiceCELoss
from monai.metrics import DiceMetric
from monai.networks.utils import one_hot

from engine.config.finetune import FinetuneConfig
from engine.data.labelled import CaseSelection, LabelledDataset, verify_cases
from engine.finetuning.data import IMAGE, LABEL, cached, segmentation_transforms
from engine.inference.postprocess import keep_largest_components, never_hurts
from engine.inference.run import sliding_window_probabilities
from engine.models.segmenter import build_segmenter
from engine.runtime.distributed import DistInfo
from engine.training.batches import endless_batches
from engine.training.tensorboard import slice_preview

PREVIEW_CASES = 2  # validation cases shown in TensorBoard, to keep the event files small


class SegmentationTask:
    kind = "segmentation"

    def __init__(self, cfg: FinetuneConfig, dataset: LabelledDataset, cases: CaseSelection):
        self.cfg, self.cases = cfg, cases
        self.labels = dict(sorted(dataset.labels.items(), key=lambda kv: kv[1]))  # channel k = k-th value
        self.values = list(self.labels.values())
        self._validation = None
        self.shard = DistInfo()  # this process's rank among torchrun's
        self.largest_component: list[str] = []  # labels whose largest component alone scored better, last validation
        self.previews: dict[str, np.ndarray] = {}  # last validation: name -> RGB [3, H, W] middle slice

    def check_data(self) -> None:
        verify_cases(self.cases.training + self.cases.validation, self.labels)

    def build_model(self) -> nn.Module:
        m = self.cfg.model
        return build_segmenter(m.backbone, self.cfg.encoder, m.roi, len(self.labels), m.feature_size, m.decoder)

    def batches(self, start_step: int) -> Iterator:
        dataset = cached(self.cases.training, segmentation_transforms(self.cfg, self.values, train=True))
        return endless_batches(dataset, self.cfg.data.batch_size, self.cfg.train.seed, start_step, self.shard,
                               drop_last=False)

    def step_fn(self, model: nn.Module, device: torch.device):
        # Dice over the whole batch of crops, without the background (nnU-Net's batch Dice): per crop, a structure
        # absent from that crop scores Dice ~0 for any false positive, which teaches the network never to predict a
        # small structure at all (the demo's spleen, stomach and aorta stayed at train Dice 0 for 400 steps)
        loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, include_background=False, batch=True)

        def step(batch, progress):
            x, y = _tensor(batch[IMAGE]).to(device), _tensor(batch[LABEL]).to(device)  # [B, 1, R, R, R] each
            loss = loss_fn(model(x).float(), y)
            yield {"loss": loss}, loss
        return step

    def validate(self, model: nn.Module, device: torch.device, amp) -> dict[str, float]:
        """Sliding-window Dice per label on the validation cases (model grid) and their mean, each label scored as
        inference will give it: its largest connected component alone where that never scores worse here."""
        if self._validation is None:
            transform = segmentation_transforms(self.cfg, self.values, train=False)
            self._validation = cached(self.cases.validation, transform)
        raw, largest = (DiceMetric(include_background=False, reduction="none", ignore_empty=True) for _ in range(2))
        n = len(self.labels)
        self.previews = {}
        for case, item in enumerate(self._validation):
            probs = sliding_window_probabilities(model, _tensor(item[IMAGE])[None], self.cfg.model.roi,
                                                 self.cfg.val.overlap, self.cfg.val.sw_batch_size, amp)
            index = probs.argmax(0)  # [X, Y, Z] channel indices
            if case < PREVIEW_CASES:
                self.previews[f"validation/case_{case}"] = slice_preview(
                    _tensor(item[IMAGE])[0].numpy(), index.numpy(), _tensor(item[LABEL])[0].numpy())
            truth = one_hot(_tensor(item[LABEL])[None].long(), n)
            raw(one_hot(index[None, None], n), truth)
            kept = torch.from_numpy(keep_largest_components(index.numpy(), range(1, n)))
            largest(one_hot(kept[None, None], n), truth)
        model.train()
        before, after = raw.aggregate().cpu().numpy(), largest.aggregate().cpu().numpy()  # [cases, labels]
        keep = never_hurts(before, after)
        self.largest_component = [name for name, k in zip(list(self.labels)[1:], keep) if k]
        return dice_metrics(_case_mean(np.where(keep, after, before)), list(self.labels)[1:])

    @staticmethod
    def score(metrics: dict[str, float]) -> float:
        """What chooses the best model: the mean Dice over labels."""
        return metrics["val_mean_dice"]

    def model_extra(self) -> dict:
        d = self.cfg.data
        return {"labels": self.labels, "spacing": list(d.spacing), "hu_window": list(d.hu_window),
                "roi": self.cfg.model.roi, "largest_component": list(self.largest_component)}


def dice_metrics(per_label: np.ndarray, names: list[str]) -> dict[str, float]:
    """{"val_mean_dice": mean over labels present, "dice/<name>": ...}; NaN where a label never appears."""
    values = [float(v) for v in per_label]
    finite = [v for v in values if math.isfinite(v)]
    metrics = {"val_mean_dice": float(np.mean(finite)) if finite else float("nan")}
    metrics.update({f"dice/{name}": round(v, 6) if math.isfinite(v) else v for name, v in zip(names, values)})
    return metrics


def _case_mean(dice: np.ndarray) -> np.ndarray:
    """[cases, labels] -> [labels], over the cases where each label is scored (NaN where it never is)."""
    scored = ~np.isnan(dice)
    totals = np.where(scored, dice, 0.0).sum(0)
    return np.where(scored.any(0), totals / np.maximum(scored.sum(0), 1), np.nan)


def _tensor(x) -> torch.Tensor:
    return x.as_tensor() if hasattr(x, "as_tensor") else torch.as_tensor(np.asarray(x))
