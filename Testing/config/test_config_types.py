"""Every config is built by one function that checks each value against its field's type: numbers YAML reads
as strings become numbers, lists become tuples, words stay words; anything else is refused in one line naming the
setting, the value and the type."""
from __future__ import annotations

import pytest

from engine.cli import parse_sets
from engine.config.finetune import build_finetune_config
from engine.config.pretrain import build_config, config_from_dict
from engine.config.schema import load_yaml
from engine.errors import UserError
from engine.study.config import load_study_config


def test_set_values_are_read_as_yaml_1_2():
    sets = parse_sets(["train.lr=5e-4", "train.amp=off", "a=no", "b=true", "c=[1,2,3]", "d=-1e3", "e=5", "f=null"])
    assert sets == {"train.lr": 5e-4, "train.amp": "off", "a": "no", "b": True, "c": [1, 2, 3], "d": -1000.0,
                    "e": 5, "f": None}
    assert type(sets["train.lr"]) is float and type(sets["e"]) is int


def test_set_that_is_not_yaml_is_one_user_error():
    with pytest.raises(UserError, match=r"--set data.spacing=\[1,2: not a YAML value"):
        parse_sets(["data.spacing=[1,2"])


def test_values_are_converted_when_nothing_is_lost():
    cfg = build_config("tiny", "mim", parse_sets(["train.lr=5e-4", "train.amp=off", "loss.norm_pix=off",
                                                  "data.spacing=[2,2,2]", "train.views_per_pass=2.0",
                                                  "train.clip_grad=1"]))
    assert cfg.train.lr == 5e-4 and type(cfg.train.lr) is float
    assert cfg.train.amp == "off"
    assert cfg.loss.norm_pix is False
    assert cfg.data.spacing == (2.0, 2.0, 2.0) and all(type(v) is float for v in cfg.data.spacing)
    assert cfg.train.views_per_pass == 2 and type(cfg.train.views_per_pass) is int
    assert type(cfg.train.clip_grad) is float
    # what YAML 1.1 (yaml.safe_load) makes of the same words, e.g. in a Python dict: converted the same way
    cfg = build_config("tiny", "mim", {"train.lr": "5e-4", "loss.norm_pix": "no", "train.steps": 3.0})
    assert (cfg.train.lr, cfg.loss.norm_pix, cfg.train.steps) == (5e-4, False, 3) and type(cfg.train.steps) is int


@pytest.mark.parametrize("pair,expected", [
    ("train.steps=abc", "setting 'train.steps' expects an integer, got 'abc'"),
    ("train.steps=1.5", "setting 'train.steps' expects an integer, got 1.5"),
    ("train.steps=true", "setting 'train.steps' expects an integer, got True"),
    ("train.lr=fast", "setting 'train.lr' expects a number, got 'fast'"),
    ("train.lr=[1]", "setting 'train.lr' expects a number, got [1]"),
    ("train.amp=false", "setting 'train.amp' expects a string, got False"),
    ("loss.norm_pix=maybe", "setting 'loss.norm_pix' expects true or false, got 'maybe'"),
    ("data.spacing=3", "setting 'data.spacing' expects a list of numbers, got 3"),
    ("data.spacing=[1,a,2]", "setting 'data.spacing' expects a list of numbers, got [1, 'a', 2]"),
    ("data.cache_dir=[a]", "setting 'data.cache_dir' expects a string or null, got ['a']"),
    ("train.views_per_pass=0.5", "setting 'train.views_per_pass' expects an integer or a string, got 0.5"),
    ("train=5", "setting 'train' is a section of settings"),
])
def test_wrong_types_are_refused_naming_setting_value_and_type(pair, expected):
    with pytest.raises(UserError) as err:
        build_config("tiny", "mim", parse_sets([pair]))
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_fine_tuning_saved_and_study_configs_are_checked_too():
    cfg = build_finetune_config("tiny", overrides=parse_sets(["data.hu_window=[-175,250]", "train.lr=1e-4"]))
    assert cfg.data.hu_window == (-175.0, 250.0) and cfg.train.lr == 1e-4
    with pytest.raises(UserError, match="setting 'crop.samples' expects an integer, got 'two'"):
        build_finetune_config("tiny", overrides={"crop.samples": "two"})
    tree = build_config("tiny", "mim").to_dict()
    tree["train"]["lr"] = "oops"
    with pytest.raises(UserError, match="setting 'train.lr' expects a number"):
        config_from_dict(tree)
    with pytest.raises(UserError, match="setting 'seeds' expects a list of integers, got 'zero'"):
        load_study_config("tiny", {"seeds": "zero"})


def test_presets_read_as_before():
    for preset in ("tiny", "small", "base"):
        for method in ("mim", "mae", "hybridmim"):
            cfg = build_config(preset, method)
            assert type(cfg.train.lr) is float and type(cfg.train.steps) is int
        assert type(build_finetune_config(preset).data.hu_window[0]) is float
    assert load_yaml("a: off\nb: 1.0e-3\nc: 5e-4\nd: yes\n") == {"a": "off", "b": 1e-3, "c": 5e-4, "d": "yes"}
