"""detfocal.config: strict YAML -> frozen dataclasses, _base_ inheritance, --set overrides."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from detfocal.config import (Config, apply_overrides, config_from_dict, config_to_dict, config_to_yaml, data_paths,
                             load_config, model_kwargs, optimizer_kwargs, scheduler_kwargs)

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").rglob("*.yaml"))


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def test_every_shipped_config_loads_and_round_trips():
    assert len(CONFIGS) >= 4
    for path in CONFIGS:
        cfg = load_config(path)
        assert config_from_dict(config_to_dict(cfg)) == cfg, path


def test_defaults_fill_missing_keys(tmp_path):
    cfg = load_config(write(tmp_path / "c.yaml", "train: {lr: 0.5}\n"))
    assert cfg.train == dataclasses.replace(Config().train, lr=0.5)
    assert (cfg.data, cfg.eval, cfg.imports) == (Config().data, Config().eval, ())
    # The head's missing parameters come from the registered head's own defaults.
    assert cfg.model.head == {"type": "focal", "prior_probability": 0.01, "num_convs": 4, "alpha": 0.25, "gamma": 2.0,
                              "normalization": "batch", "ema_momentum": 0.9, "norm": "none"}


def test_config_is_frozen():
    cfg = Config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.lr = 1.0  # type: ignore[misc]


def test_unknown_key_names_the_dotted_key_and_the_allowed_ones(tmp_path):
    path = write(tmp_path / "c.yaml", "train:\n  lrr: 0.1\n")
    with pytest.raises(ValueError) as info:
        load_config(path)
    message = str(info.value)
    assert "train.lrr" in message and "did you mean train.lr" in message
    assert "weight_decay" in message and "\n" not in message


def test_unknown_head_key_lists_the_parameters_of_that_head_type(tmp_path):
    with pytest.raises(ValueError, match=r"unknown key model\.head\.gama for head type 'focal'; allowed keys in "
                                         r"model\.head: type, prior_probability, num_convs, alpha, gamma, "):
        load_config(write(tmp_path / "c.yaml", "model: {head: {gama: 1.0}}\n"))
    with pytest.raises(ValueError, match=r"unknown key model\.head\.alpha for head type 'qfl'.* beta, norm$"):
        config_from_dict({"model": {"head": {"alpha": 0.5}}}, ["model.head.type=qfl"])  # alpha stays behind


def test_head_type_must_be_registered():
    with pytest.raises(ValueError, match=r"model\.head\.type: unknown head 'fcos'; registered: focal, .*qfl, vfl"):
        config_from_dict({"model": {"head": {"type": "fcos"}}})


def test_head_values_are_checked_against_the_head_signature():
    with pytest.raises(ValueError, match=r"^model\.head\.gamma: expected float, got 'two'"):
        config_from_dict({}, ["model.head.gamma=two"])
    with pytest.raises(ValueError, match=r"^model\.head\.num_convs: expected int"):
        config_from_dict({}, ["model.head.num_convs=2.5"])
    assert config_from_dict({}, ["model.head.alpha=null"]).model.head["alpha"] is None


def test_a_section_with_another_type_replaces_instead_of_merging(tmp_path):
    write(tmp_path / "base.yaml", "model: {head: {type: focal, gamma: 3.0, alpha: 0.5, norm: gn}}\n")
    child = write(tmp_path / "child.yaml", "_base_: base.yaml\nmodel: {head: {type: qfl, beta: 1.5}}\n")
    head = load_config(child).model.head
    assert head == {"type": "qfl", "prior_probability": 0.01, "num_convs": 4, "beta": 1.5, "norm": "none"}
    same_type = load_config(write(tmp_path / "same.yaml", "_base_: base.yaml\nmodel: {head: {gamma: 1.0}}\n"))
    assert (same_type.model.head["gamma"], same_type.model.head["alpha"], same_type.model.head["norm"]) == (1.0, 0.5, "gn")
    via_set = config_from_dict({}, ["model.head={type: vfl, alpha: 0.5}"]).model.head
    assert via_set["type"] == "vfl" and via_set["alpha"] == 0.5 and "normalization" not in via_set


def test_unknown_top_level_section(tmp_path):
    with pytest.raises(ValueError, match="unknown key solver; allowed keys in config: model, data, train, eval, imports"):
        load_config(write(tmp_path / "c.yaml", "solver: {lr: 1}\n"))


@pytest.mark.parametrize("override, key, expected", [
    ("train.lr=fast", "train.lr", "float"),
    ("train.epochs=1.5", "train.epochs", "int"),
    ("train.epochs=true", "train.epochs", "int"),          # a bool is not an int
    ("train.deterministic=1", "train.deterministic", "bool"),
    ("train.optimizer=adam", "train.optimizer", "one of 'sgd', 'adamw'"),
    ("model.head.norm=ln", "model.head.norm", "one of 'none', 'gn', 'bn'"),
    ("data.augment.scale_jitter=[0.5]", "data.augment.scale_jitter", "a list [float, float] or null"),
    ("model.anchor_sizes=[[8, x]]", "model.anchor_sizes", "a list of (int or a list of int) or null"),
    ("train=3", "train", "a section"),
])
def test_wrong_type_names_the_key_and_the_expected_type(override, key, expected):
    with pytest.raises(ValueError) as info:
        config_from_dict({}, [override])
    assert str(info.value).startswith(f"{key}: expected {expected}"), str(info.value)


@pytest.mark.parametrize("override, key", [
    ("train.batch_size=0", "train.batch_size"),
    ("train.lr=-1.0", "train.lr"),
    ("train.schedule.steps=[80, 60]", "train.schedule.steps"),
    ("model.head.alpha=1.5", "model.head.alpha"),
    ("eval.interval=0", "eval.interval"),
])
def test_out_of_range_value_names_the_key(override, key):
    with pytest.raises(ValueError, match=rf"^{key}: expected"):
        config_from_dict({}, [override])


def test_int_is_accepted_where_a_float_is_expected():
    cfg = config_from_dict({}, ["train.lr=1", "model.head.gamma=0"])
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert cfg.model.head["gamma"] == 0.0 and isinstance(cfg.model.head["gamma"], float)


def test_set_values_are_parsed_as_yaml():
    cfg = config_from_dict({}, ["data.subset.categories=[person,dog]", "train.weight_decay=1e-4",
                                "model.weights_backbone=", "data.train.images=/x", "model.anchor_sizes=[8,16,32,64,128]",
                                "data.subset.max_images=5", "train.grad_clip=null"])
    assert cfg.data.subset.categories == ("person", "dog")
    assert cfg.train.weight_decay == 1e-4  # PyYAML alone reads 1e-4 as a string
    assert cfg.model.weights_backbone is None
    assert cfg.data.train.images == "/x"
    assert cfg.model.anchor_sizes == (8, 16, 32, 64, 128)
    assert cfg.data.subset.max_images == 5 and cfg.train.grad_clip is None


def test_yaml_off_and_yes_stay_strings():
    # YAML 1.1 (PyYAML's default) reads off/on/yes/no as booleans; train.amp: off must stay "off".
    cfg = config_from_dict({}, ["train.amp=off", "data.subset.categories=[yes, no, on]", "train.deterministic=true"])
    assert cfg.train.amp == "off" and cfg.data.subset.categories == ("yes", "no", "on")
    assert cfg.train.deterministic is True


def test_set_a_section_merges_into_it():
    tree = apply_overrides({"model": {"head": {"gamma": 2.0, "alpha": 0.25}}}, ["model.head={gamma: 1.0}"])
    assert tree == {"model": {"head": {"gamma": 1.0, "alpha": 0.25}}}


def test_set_does_not_modify_its_input():
    tree = {"train": {"lr": 0.1}}
    apply_overrides(tree, ["train.lr=0.2"])
    assert tree == {"train": {"lr": 0.1}}


@pytest.mark.parametrize("override, match", [
    ("train.lr", "expected KEY=VALUE"),
    ("=3", "expected KEY=VALUE"),
    ("train.lr.x=3", "train.lr is a value, not a section"),
    ("train.lr=[1", "not valid YAML"),
])
def test_bad_set_raises_value_error(override, match):
    with pytest.raises(ValueError, match=match):
        apply_overrides({"train": {"lr": 0.1}}, [override])


def test_base_is_loaded_relative_to_the_file_and_deep_merged(tmp_path):
    write(tmp_path / "base" / "base.yaml", "model: {backbone: resnet18, head: {gamma: 2.0, alpha: 0.25}}\n"
                                           "train: {lr: 0.1, schedule: {type: step, steps: [10, 20]}}\n")
    child = write(tmp_path / "base" / "sub" / "child.yaml",
                  "_base_: ../base.yaml\nmodel: {head: {gamma: 0.0}}\ntrain: {schedule: {steps: [5]}}\n")
    cfg = load_config(child, ["train.lr=0.2"])
    assert cfg.model.backbone == "resnet18"
    assert cfg.model.head["gamma"] == 0.0 and cfg.model.head["alpha"] == 0.25  # dicts merge
    assert cfg.train.schedule.steps == (5,)  # lists replace
    assert cfg.train.schedule.type == "step"
    assert cfg.train.lr == 0.2  # --set applies last


def test_base_chain_and_cycle(tmp_path):
    write(tmp_path / "a.yaml", "_base_: b.yaml\ntrain: {lr: 0.3}\n")
    write(tmp_path / "b.yaml", "_base_: c.yaml\ntrain: {epochs: 3}\n")
    write(tmp_path / "c.yaml", "train: {batch_size: 7}\n")
    cfg = load_config(tmp_path / "a.yaml")
    assert (cfg.train.lr, cfg.train.epochs, cfg.train.batch_size) == (0.3, 3, 7)
    write(tmp_path / "c.yaml", "_base_: a.yaml\n")
    with pytest.raises(ValueError, match="_base_ cycle"):
        load_config(tmp_path / "a.yaml")


def test_missing_config_or_base_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(FileNotFoundError, match="gone.yaml"):
        load_config(write(tmp_path / "c.yaml", "_base_: gone.yaml\n"))


def test_invalid_yaml_is_one_line_value_error(tmp_path):
    with pytest.raises(ValueError, match="not valid YAML") as info:
        load_config(write(tmp_path / "c.yaml", "train: {lr: [\n"))
    assert "\n" not in str(info.value)


def test_yaml_output_reloads_to_the_same_config(tmp_path):
    cfg = load_config(ROOT / "configs" / "retinanet_r50_fpn_coco_subset.yaml", ["model.head.gamma=1.5"])
    reloaded = load_config(write(tmp_path / "resolved.yaml", config_to_yaml(cfg)))
    assert reloaded == cfg
    assert yaml.safe_load(config_to_yaml(cfg)) == config_to_dict(cfg)


def test_shapes_section_is_checked_against_generate():
    with pytest.raises(ValueError, match=r"unknown key data\.shapes\.num_images; allowed keys in data\.shapes: root, num_train"):
        config_from_dict({}, ["data.shapes={num_images: 5}"])
    with pytest.raises(ValueError, match=r"data\.shapes\.num_train: expected int"):
        config_from_dict({}, ["data.shapes={num_train: many}"])


def test_data_paths_fill_from_shapes_and_explicit_paths_win(tmp_path):
    cfg = config_from_dict({}, [f"data.shapes={{root: {tmp_path}}}", "data.val.images=/elsewhere"])
    paths = data_paths(cfg.data, generate=False)
    assert paths["train"] == (str(tmp_path / "train"), str(tmp_path / "annotations" / "instances_train.json"))
    assert paths["val"] == ("/elsewhere", str(tmp_path / "annotations" / "instances_val.json"))
    with pytest.raises(ValueError, match="data.train: needs 'images' and 'annotations'"):
        data_paths(Config().data)


def test_kwargs_mappers_give_plain_values():
    cfg = load_config(ROOT / "configs" / "shapes_retinanet_r18.yaml")
    kwargs = model_kwargs(cfg, num_classes=5)
    assert kwargs["num_classes"] == 5 and kwargs["backbone"] == "resnet18"
    assert kwargs["head"]["type"] == "focal" and isinstance(kwargs["anchor_sizes"], list)
    assert kwargs["score_thresh"] == cfg.eval.score_thresh
    assert optimizer_kwargs(cfg)["name"] == cfg.train.optimizer
    assert scheduler_kwargs(cfg)["schedule"] == cfg.train.schedule.type


def test_coco_configs_follow_the_paper_recipe():
    cfg = load_config(ROOT / "configs" / "retinanet_r50_fpn_coco.yaml")
    assert (cfg.train.lr, cfg.train.schedule.steps, cfg.model.min_size) == (0.01, (60000, 80000), 800)
    assert cfg.train.max_iters == 90000 and cfg.model.weights_backbone == "ResNet50_Weights.IMAGENET1K_V1"
    assert (cfg.model.head["alpha"], cfg.model.head["gamma"]) == (0.25, 2.0)
    subset = load_config(ROOT / "configs" / "retinanet_r50_fpn_coco_subset.yaml")
    assert subset.data.subset.categories and subset.model.backbone == "resnet50"


def test_import_errors_name_the_module():
    from detfocal.config import import_modules

    with pytest.raises(ValueError, match="imports: cannot import 'no_such_module_xyz'"):
        import_modules(["no_such_module_xyz"])
