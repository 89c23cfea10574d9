"""The classification task of fine-tuning: encoder + pooled linear head, cross-entropy, accuracy and AUC."""
from __future__ import annotations

import math
from typing import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.metrics import compute_roc_auc

from engine.config.finetune import FinetuneConfig
from engine.data.labelled import CaseSelection, ClassificationDataset
from engine.errors import UserError
from engine.finetuning.data import IMAGE, cached, classification_transforms
from engine.models.classifier import HybridClassifier
from engine.runtime.device import autocast
from engine.runtime.distributed import DistInfo
from engine.training.batches import endless_batches


class ClassificationTask:
    kind = "classification"

    def __init__(self, cfg: FinetuneConfig, dataset: ClassificationDataset, cases: CaseSelection):
        self.cfg, self.cases, self.classes = cfg, cases, list(dataset.classes)
        self._validation = None
        self.shard = DistInfo()  # this process's rank among torchrun's

    def check_data(self) -> None:
        """Files were checked when the list was read; nothing else to verify for whole-volume labels."""

    def build_model(self) -> nn.Module:
        if self.cfg.model.backbone != "hybrid":
            raise UserError("classification fine-tunes the hybrid encoder; SwinUNETR weights feed segmentation only")
        return HybridClassifier(self.cfg.encoder, self.cfg.model.roi, len(self.classes), self.cfg.model.head_dropout)

    def batches(self, start_step: int) -> Iterator:
        dataset = cached(self.cases.training, classification_transforms(self.cfg, train=True))
        return endless_batches(dataset, self.cfg.data.batch_size, self.cfg.train.seed, start_step, self.shard,
                               drop_last=False)

    def step_fn(self, model: nn.Module, device: torch.device):
        def step(batch, progress):
            logits = model(torch.as_tensor(batch[IMAGE]).to(device))
            loss = F.cross_entropy(logits.float(), torch.as_tensor(batch["label"]).long().to(device))
            yield {"loss": loss}, loss
        return step

    def validate(self, model: nn.Module, device: torch.device, amp) -> dict[str, float]:
        if self._validation is None:
            self._validation = cached(self.cases.validation, classification_transforms(self.cfg, train=False))
        model.eval()
        probs, truth = [], []
        with torch.no_grad(), autocast(device, amp):
            for item in self._validation:
                logits = model(torch.as_tensor(item[IMAGE])[None].to(device)).float()
                probs.append(torch.softmax(logits, 1)[0].cpu())
                truth.append(int(item["label"]))
        model.train()
        return classification_metrics(torch.stack(probs), torch.tensor(truth), len(self.classes))

    @staticmethod
    def score(metrics: dict[str, float]) -> float:
        """AUC; accuracy when AUC is undefined (a single class among the validation cases)."""
        return metrics["val_auc"] if math.isfinite(metrics["val_auc"]) else metrics["val_accuracy"]

    def model_extra(self) -> dict:
        d = self.cfg.data
        return {"classes": self.classes, "spacing": list(d.spacing), "hu_window": list(d.hu_window),
                "roi": self.cfg.model.roi}


def classification_metrics(probs: torch.Tensor, truth: torch.Tensor, n_classes: int) -> dict[str, float]:
    """Accuracy, and macro AUC (NaN when the validation cases hold a single class)."""
    accuracy = float((probs.argmax(1) == truth).float().mean())
    if len(set(truth.tolist())) < 2:
        auc = float("nan")
    else:
        auc = float(compute_roc_auc(probs, F.one_hot(truth, n_classes).float(), average="macro"))
    return {"val_auc": auc if math.isfinite(auc) else float("nan"), "val_accuracy": accuracy, "val_cases": len(truth)}
