"""The label-efficiency study's settings (`engine/configs/study/*.yaml`): the task (which labelled cases, which
value of each case's label file is the structure studied, which cases are held out for testing), the pre-training
and fine-tuning budgets, and the grid of runs (initialisations x labelled-case counts x seeds).

Typed and validated like every other config; the resolved settings are saved as STUDY/study.yaml, and a rerun in
the same folder must resolve to the same settings (it continues that study, it does not start another)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from engine.config.schema import build_dataclass, check_choice, load_yaml, merge_trees, to_plain, undot
from engine.errors import UserError

STUDY_PRESET_DIR = Path(__file__).parents[1] / "configs" / "study"
INITS = ("mim", "mae", "scratch")  # pre-trained with that method, or no pre-training at all
RUNNER_OWNED = ("train.steps", "train.seed", "val.every", "val.overlap")  # the study sets these, alike for every arm


@dataclass(frozen=True)
class TaskConfig:
    """One foreground label, derived from each case's own label file by keeping one of its values."""

    label: str = "tumour"
    cases: dict = field(default_factory=dict)  # case name -> the value of `label` in that case's label file
    test: tuple[str, ...] = ()  # held out: never trained on, only evaluated

    @property
    def pool(self) -> list[str]:
        """The training pool: every labelled case that is not a test case, sorted by name."""
        return sorted(name for name in self.cases if name not in self.test)

    def validate(self) -> None:
        if not self.cases or not all(isinstance(v, int) and v > 0 for v in self.cases.values()):
            raise UserError(f"task.cases must map case names to a positive label value, got {self.cases}")
        unknown = [name for name in self.test if name not in self.cases]
        if unknown:
            raise UserError(f"task.test names {unknown}, which are not in task.cases {sorted(self.cases)}")
        if not self.test or not self.pool:
            raise UserError(f"task needs at least one test case and one training case; test={list(self.test)}, "
                            f"training pool={self.pool}")


@dataclass(frozen=True)
class PretrainStage:
    """One pre-training per method, shared by every fine-tuning run from it. MiM and MAE get the same steps."""

    preset: str = "small"
    steps: int = 200
    seed: int = 0
    include_test_images: bool = True  # the test cases' images (never their labels) are unlabelled volumes too
    overrides: dict = field(default_factory=dict)  # dotted settings, as `pretrain --set`


@dataclass(frozen=True)
class FinetuneStage:
    """Every arm fine-tunes with exactly these settings and steps; the last weights are evaluated."""

    preset: str = "small"
    steps: int = 300
    overrides: dict = field(default_factory=dict)  # dotted settings, as `finetune --set`


@dataclass(frozen=True)
class EvaluateStage:
    overlap: float = 0.5  # sliding-window overlap when segmenting the test cases


@dataclass(frozen=True)
class StudyConfig:
    study: str = "label-efficiency"
    data: str = "../shared/data/ct-2mm"  # <case>_ct.nii.gz and <case>_label.nii.gz; relative to the current folder
    out: str = "runs/study"
    task: TaskConfig = field(default_factory=TaskConfig)
    pretrain: PretrainStage = field(default_factory=PretrainStage)
    finetune: FinetuneStage = field(default_factory=FinetuneStage)
    evaluate: EvaluateStage = field(default_factory=EvaluateStage)
    inits: tuple[str, ...] = INITS
    train_cases: tuple[int, ...] = (1, 2, 4)
    seeds: tuple[int, ...] = (0, 1, 2)

    @property
    def pretrain_methods(self) -> list[str]:
        return [init for init in self.inits if init != "scratch"]

    def validate(self) -> "StudyConfig":
        check_choice("study", self.study, ("label-efficiency",))
        self.task.validate()
        for init in self.inits:
            check_choice("inits", init, INITS)
        _unique_nonempty("inits", self.inits)
        _unique_nonempty("seeds", self.seeds)
        _unique_nonempty("train_cases", self.train_cases)
        pool = len(self.task.pool)
        if any(not 1 <= n <= pool for n in self.train_cases):
            raise UserError(f"train_cases {list(self.train_cases)}: the training pool has {pool} case(s) "
                            f"({', '.join(self.task.pool)})")
        if self.pretrain.steps < 1 or self.finetune.steps < 1:
            raise UserError("pretrain.steps and finetune.steps must be >= 1")
        _runner_owned("pretrain.overrides", self.pretrain.overrides)
        _runner_owned("finetune.overrides", self.finetune.overrides)
        if not 0.0 <= self.evaluate.overlap < 1.0:
            raise UserError(f"evaluate.overlap must lie in [0, 1), got {self.evaluate.overlap}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return to_plain(dataclasses.asdict(self))


def _unique_nonempty(name: str, values: tuple) -> None:
    if not isinstance(values, tuple) or not values or len(set(values)) != len(values):
        raise UserError(f"{name} must be a non-empty list without repeats, got {values}")


def _runner_owned(name: str, overrides: dict) -> None:
    owned = [key for key in dotted(overrides) if key in RUNNER_OWNED]
    if owned:
        raise UserError(f"{name} may not set {owned}: the study sets them (use pretrain.steps / finetune.steps)")


def dotted(tree: dict, prefix: str = "") -> dict[str, Any]:
    """{"train": {"lr": 1}} -> {"train.lr": 1}; already dotted keys stay as they are."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(dotted(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def resolve_config_path(config: str) -> Path:
    """A YAML file, or the name of a preset in engine/configs/study (`cpu`, `gpu`, `tiny`)."""
    path = Path(config)
    if path.is_file():
        return path
    preset = STUDY_PRESET_DIR / f"{config}.yaml"
    if preset.is_file():
        return preset
    names = sorted(p.stem for p in STUDY_PRESET_DIR.glob("*.yaml"))
    raise UserError(f"--config {config}: no such file, nor a study preset ({', '.join(names)})")


def load_study_config(config: str, overrides: dict[str, Any] | None = None) -> StudyConfig:
    """The study YAML, then dotted overrides (`--set finetune.steps=100`)."""
    path = resolve_config_path(config)
    try:
        tree = load_yaml(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as err:
        raise UserError(f"{path}: not a readable study YAML ({err})") from None
    tree = merge_trees(tree, undot(overrides or {}))
    return study_config_from_dict(tree)


def study_config_from_dict(tree: dict[str, Any]) -> StudyConfig:
    return build_dataclass(StudyConfig, tree, "").validate()


def save_study_config(cfg: StudyConfig, out_dir: Path) -> Path:
    """STUDY/study.yaml; a folder that already holds a study with other settings is refused (mixing is silent)."""
    path = out_dir / "study.yaml"
    mine = cfg.to_dict()
    if path.exists():
        saved = load_yaml(path.read_text(encoding="utf-8"))
        changed = [key for key in sorted(set(saved) | set(mine)) if saved.get(key) != mine.get(key) and key != "out"]
        if changed:
            raise UserError(f"{out_dir} holds a study with other settings ({', '.join(changed)} differ); rerun with "
                            "the same config to continue it, or choose another --out")
        return path
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(mine, sort_keys=False), encoding="utf-8")
    except OSError as err:
        raise UserError(f"{out_dir}: cannot write the study folder ({err.strerror})") from None
    return path
