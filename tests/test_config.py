"""detfocal.config: YAML 1.2 -> frozen pydantic models, _base_ inheritance, --set overrides."""
from __future__ import annotations

import inspect
import sys
import time
import uuid
from pathlib import Path

import pydantic
import pytest

from detfocal.config import (Config, apply_overrides, config_from_dict, config_to_dict, config_to_yaml, data_paths,
                             import_modules, load_config, model_kwargs, optimizer_kwargs, parse_override_value,
                             scheduler_kwargs)
from detfocal.utils.registry import HEADS

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").rglob("*.yaml"))


def head_defaults(head_type: str, **given) -> dict:
    """What model.head should resolve to: the registered head's signature defaults, then ``given``."""
    from detfocal.utils.registry import HEADS

    parameters = inspect.signature(HEADS.get(head_type)).parameters.values()
    defaults = {p.name: p.default for p in parameters if p.default is not p.empty and p.name != "norm_layer"}
    return {"type": head_type, "norm": "none", **defaults, **given}


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def test_checkpoint_dict_and_printed_yaml_of_every_shipped_config_rebuild_it(tmp_path):
    # What a checkpoint stores (config_to_dict) and what --print-config shows (config_to_yaml)
    # must give back the same config, with nothing lost to tuples, defaults or float formatting.
    assert len(CONFIGS) >= 4
    for path in CONFIGS:
        cfg = load_config(path, ["model.head.gamma=1.5"])
        assert config_from_dict(config_to_dict(cfg)) == cfg, path
        assert load_config(write(tmp_path / "resolved.yaml", config_to_yaml(cfg))) == cfg, path


def test_defaults_fill_missing_keys(tmp_path):
    cfg = load_config(write(tmp_path / "c.yaml", "train: {lr: 0.5}\n"))
    assert cfg.train == Config().train.model_copy(update={"lr": 0.5})
    assert (cfg.data, cfg.eval, cfg.imports) == (Config().data, Config().eval, ())
    assert cfg.data.workers == "auto" and cfg.data.skip_bad_images is False
    # The head's missing parameters come from the registered head's own defaults.
    assert cfg.model.head == head_defaults("focal")
    assert (cfg.model.head["alpha"], cfg.model.head["gamma"], cfg.model.head["num_convs"]) == (0.25, 2.0, 4)


def test_config_is_frozen():
    cfg = Config()
    with pytest.raises(pydantic.ValidationError, match="frozen"):
        cfg.train.lr = 1.0  # type: ignore[misc]


def test_unknown_key_names_the_dotted_key_and_the_allowed_ones(tmp_path):
    with pytest.raises(ValueError) as info:
        load_config(write(tmp_path / "c.yaml", "train:\n  lrr: 0.1\n"))
    message = str(info.value)
    assert message.startswith("unknown key train.lrr (did you mean train.lr?); allowed keys in train: epochs, ")
    assert "weight_decay" in message and "\n" not in message
    with pytest.raises(ValueError, match="^unknown key solver; allowed keys in config: model, data, train, eval, "
                                         "imports$"):
        config_from_dict({"solver": {"lr": 1}})


def test_unknown_head_key_lists_the_parameters_of_that_head_type():
    with pytest.raises(ValueError, match=r"^unknown key model\.head\.gama for head type 'focal' \(did you mean "
                                         r"model\.head\.gamma\?\); allowed keys in model\.head: type, norm, "
                                         r"prior_probability, num_convs, alpha, gamma, normalization, ema_momentum"):
        config_from_dict({}, ["model.head.gama=1.0"])
    with pytest.raises(ValueError, match=r"^unknown key model\.head\.alpha for head type 'qfl'.*: type, norm, "
                                         r"prior_probability, num_convs, beta"):
        config_from_dict({}, ["model.head={type: qfl, alpha: 0.5}"])


def test_head_values_are_checked_against_the_head_signature():
    with pytest.raises(ValueError, match=r"^model\.head\.gamma: expected float, got 'two' \(str\)$"):
        config_from_dict({}, ["model.head.gamma=two"])
    with pytest.raises(ValueError, match=r"^model\.head\.num_convs: expected int, got 2\.5"):
        config_from_dict({}, ["model.head.num_convs=2.5"])
    with pytest.raises(ValueError, match=r"^model\.head\.iou_weighted: expected bool, got 1"):
        config_from_dict({}, ["model.head={type: vfl, iou_weighted: 1}"])
    with pytest.raises(ValueError, match=r"^model\.head\.norm: expected 'none', 'gn' or 'bn', got 'ln'"):
        config_from_dict({}, ["model.head.norm=ln"])
    assert config_from_dict({}, ["model.head.alpha=null"]).model.head["alpha"] is None


@pytest.mark.parametrize("override, key, expected", [
    ("train.lr=fast", "train.lr", "float, got 'fast' (str)"),
    ("train.epochs=1.5", "train.epochs", "int, got 1.5 (float)"),
    ("train.epochs=true", "train.epochs", "int, got True (bool)"),          # a bool is not an int
    ("train.deterministic=1", "train.deterministic", "bool, got 1 (int)"),
    ("train.optimizer=adam", "train.optimizer", "'sgd' or 'adamw', got 'adam'"),
    ("data.augment.scale_jitter=[0.5, x]", "data.augment.scale_jitter[1]", "float, got 'x'"),
    ("data.augment.scale_jitter=0.5", "data.augment.scale_jitter", "a list, got 0.5"),
    ("model.anchor_sizes=[[8, x]]", "model.anchor_sizes[0][1]", "int, got 'x'"),
    ("model.anchor_sizes=[8, x]", "model.anchor_sizes[1]", "int or a list, got 'x'"),  # a union's arms, joined
    ("data.subset.categories=[car, 1.5]", "data.subset.categories[1]", "str or int, got 1.5"),
    ("imports=[../evil]", "imports[0]", "a module name, got '../evil'"),
    ("train=3", "train", "a section (mapping), got 3 (int)"),
])
def test_wrong_type_names_the_key_the_value_and_the_expected_type(override, key, expected):
    with pytest.raises(ValueError) as info:
        config_from_dict({}, [override])
    assert str(info.value).startswith(f"{key}: expected {expected}"), str(info.value)


@pytest.mark.parametrize("override, message", [
    ("train.batch_size=0", "train.batch_size: expected > 0, got 0 (int)"),
    ("train.lr=-1.0", "train.lr: expected > 0, got -1.0"),
    ("train.schedule.steps=[80, 60]", "train.schedule.steps: expected strictly increasing iterations, got [80, 60]"),
    ("model.bg_iou_thresh=0.6", "model.bg_iou_thresh: expected <= model.fg_iou_thresh (0.5), got 0.6"),
    ("model.head.gamma=-1", "model.head.gamma: expected >= 0, got -1 (int)"),
    ("model.head.prior_probability=1", "model.head.prior_probability: expected < 1, got 1"),
    ("data.workers=-1", "data.workers: expected >= 0 or 'auto', got -1"),
    ("data.workers=many", "data.workers: expected int or 'auto', got 'many'"),
    ("eval.interval=0", "eval.interval: expected > 0, got 0"),
])
def test_out_of_range_value_names_the_key(override, message):
    with pytest.raises(ValueError) as info:
        config_from_dict({}, [override])
    assert str(info.value).startswith(message), str(info.value)


def test_infinite_and_nan_floats_are_rejected(tmp_path):
    with pytest.raises(ValueError, match=r"^train\.lr: expected a finite float, got inf \(float\)$"):
        load_config(write(tmp_path / "c.yaml", "train: {lr: .inf}\n"))
    with pytest.raises(ValueError, match=r"^model\.head\.gamma: expected a finite float, got nan"):
        config_from_dict({}, ["model.head.gamma=.nan"])
    with pytest.raises(ValueError, match=r"^train\.grad_clip: expected a finite float"):
        config_from_dict({"train": {"grad_clip": float("inf")}})


def test_int_is_accepted_where_a_float_is_expected():
    cfg = config_from_dict({}, ["train.lr=1", "model.head.gamma=0"])
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert cfg.model.head["gamma"] == 0.0 and isinstance(cfg.model.head["gamma"], float)


def test_new_data_keys_are_typed():
    cfg = config_from_dict({}, ["data.skip_bad_images=true", "data.workers=0"])
    assert cfg.data.skip_bad_images is True and cfg.data.workers == 0
    with pytest.raises(ValueError, match=r"^data\.skip_bad_images: expected bool, got 'off'"):
        config_from_dict({}, ["data.skip_bad_images=off"])


def test_error_values_are_truncated_to_one_short_line():
    with pytest.raises(ValueError) as info:
        config_from_dict({}, ["train.epochs=" + "x" * 10_000])
    assert len(str(info.value)) < 150 and "\n" not in str(info.value)


# ----------------------------------------------------------------------------------------------
# YAML 1.2 scalars, in files and in --set values


@pytest.mark.parametrize("text, value", [
    ("1e-1", 0.1), ("1E4", 1e4), (".5", 0.5), ("-2.", -2.0), ("3", 3), ("010", 10), ("0x1F", "0x1F"),
    ("true", True), ("False", False), ("null", None), ("", None), ("~", None),
    ("off", "off"), ("on", "on"), ("yes", "yes"), ("no", "no"), ("y", "y"),   # YAML 1.1 booleans stay strings
    ("1_000", "1_000"), ("1:30", "1:30"), ("2024-01-02", "2024-01-02"),      # YAML 1.1 ints and dates too
    ("[person, 1]", ["person", 1]), ("{gamma: 1}", {"gamma": 1}),
])
def test_override_values_follow_yaml_1_2(text, value):
    assert parse_override_value(text) == value and type(parse_override_value(text)) is type(value)


def test_config_files_follow_yaml_1_2(tmp_path):
    cfg = load_config(write(tmp_path / "c.yaml", "train: {amp: off, weight_decay: 1e-4, deterministic: true}\n"
                                                 "data: {subset: {categories: [yes, no, on]}}\n"))
    assert cfg.train.amp == "off" and cfg.train.weight_decay == 1e-4 and cfg.train.deterministic is True
    assert cfg.data.subset.categories == ("yes", "no", "on")
    # "<<" is no merge key in YAML 1.2 (PyYAML's copy of merged aliases is unbounded): an unknown key here.
    with pytest.raises(ValueError, match=r"^unknown key train\.<<"):
        load_config(write(tmp_path / "m.yaml", "train: {<<: {lr: 0.1}}\n"))


def test_set_values_are_parsed_as_yaml():
    cfg = config_from_dict({}, ["data.subset.categories=[person,dog]", "train.weight_decay=1e-4",
                                "model.weights_backbone=", "data.train.images=/x",
                                "model.anchor_sizes=[8,16,32,64,128]", "data.subset.max_images=5",
                                "train.grad_clip=null", "train.amp=off"])
    assert cfg.data.subset.categories == ("person", "dog")
    assert cfg.train.weight_decay == 1e-4 and cfg.train.amp == "off"
    assert cfg.model.weights_backbone is None and cfg.data.train.images == "/x"
    assert cfg.model.anchor_sizes == (8, 16, 32, 64, 128)
    assert cfg.data.subset.max_images == 5 and cfg.train.grad_clip is None


# ----------------------------------------------------------------------------------------------
# Size bounds: a few hundred bytes of nested aliases must not expand


def _laughs(flow: bool = False, mapping: bool = False) -> str:
    """A "billion laughs": 9 levels of 9 aliases, 9**9 values once expanded, in about 500 bytes."""
    def level(items: list[str]) -> str:
        return "{" + ", ".join(f"k{i}: {item}" for i, item in enumerate(items)) + "}" if mapping else \
            "[" + ",".join(items) + "]"
    lines = [f"a: &a {level(['x'] * 9)}"]
    for previous, name in zip("abcdefgh", "bcdefghi"):
        lines.append(f"{name}: &{name} {level([f'*{previous}'] * 9)}")
    return "{" + ", ".join(lines) + "}" if flow else "\n".join(lines) + "\n"


def _indent(text: str, spaces: int) -> str:
    return "".join(" " * spaces + line + "\n" for line in text.splitlines())


@pytest.mark.parametrize("make", [
    pytest.param(lambda tmp: load_config(write(tmp / "c.yaml", _laughs())), id="top-level"),
    pytest.param(lambda tmp: load_config(write(tmp / "c.yaml", _laughs(mapping=True))), id="mappings"),
    pytest.param(lambda tmp: load_config(write(tmp / "c.yaml", "imports:\n" + _indent(_laughs(), 2))), id="imports"),
    pytest.param(lambda tmp: load_config(write(tmp / "c.yaml", "model:\n  head:\n" + _indent(_laughs(), 4))),
                 id="model.head"),
    pytest.param(lambda tmp: load_config(write(tmp / "c.yaml", "model: {head: {type: focal}}\n"),
                                         ["model.head.x=" + _laughs(flow=True)]), id="--set"),
    pytest.param(lambda tmp: load_config(write(tmp / "c.yaml", "train: " + "[" * 5000 + "]" * 5000 + "\n")),
                 id="deep-nesting"),
    pytest.param(lambda tmp: config_from_dict({"model": {"head": _shared_lists()}}), id="checkpoint-dict"),
])
def test_nested_aliases_fail_fast_with_a_one_line_error(tmp_path, make):
    start = time.perf_counter()
    with pytest.raises(ValueError) as info:
        make(tmp_path)
    assert time.perf_counter() - start < 2.0
    assert "\n" not in str(info.value) and len(str(info.value)) < 400


def _shared_lists() -> dict:
    # What an unpickled checkpoint can hold too: the same list referenced nine times per level.
    level: list = ["x"] * 9
    for _ in range(8):
        level = [level] * 9
    return {"a": level}


# ----------------------------------------------------------------------------------------------
# _base_, --set, and switching the head type


def test_base_is_loaded_relative_to_the_file_and_deep_merged(tmp_path):
    write(tmp_path / "base" / "base.yaml", "model: {backbone: resnet18, head: {gamma: 2.0, alpha: 0.5}}\n"
                                           "train: {lr: 0.1, schedule: {type: step, steps: [10, 20]}}\n")
    child = write(tmp_path / "base" / "sub" / "child.yaml",
                  "_base_: ../base.yaml\nmodel: {head: {gamma: 0.0}}\ntrain: {schedule: {steps: [5]}}\n")
    cfg = load_config(child, ["train.lr=0.2"])
    assert cfg.model.backbone == "resnet18"
    assert cfg.model.head["gamma"] == 0.0 and cfg.model.head["alpha"] == 0.5  # mappings merge
    assert cfg.train.schedule.steps == (5,)  # lists replace
    assert cfg.train.schedule.type == "step"
    assert cfg.train.lr == 0.2  # --set applies last


def test_switching_the_head_type_drops_the_old_heads_parameters(tmp_path):
    base = write(tmp_path / "base.yaml", "model: {head: {alpha: 0.5, gamma: 3.0, normalization: image, norm: gn}}\n")
    vfl = load_config(base, ["model.head.type=vfl"]).model.head
    assert vfl == head_defaults("vfl")  # vfl's own defaults, not the focal head's values
    assert vfl["alpha"] == 0.75 and vfl["gamma"] == 2.0
    child = write(tmp_path / "child.yaml", "_base_: base.yaml\nmodel: {head: {type: qfl, beta: 1.5}}\n")
    assert load_config(child).model.head == head_defaults("qfl", beta=1.5)
    # Naming the same type (the default included) merges as usual.
    same = load_config(write(tmp_path / "same.yaml", "_base_: base.yaml\nmodel: {head: {type: focal, gamma: 1.0}}\n"))
    assert (same.model.head["gamma"], same.model.head["alpha"], same.model.head["norm"]) == (1.0, 0.5, "gn")
    via_set = load_config(base, ["model.head={type: vfl, alpha: 0.5}", "model.head.gamma=1.0"]).model.head
    assert (via_set["type"], via_set["alpha"], via_set["gamma"], via_set["norm"]) == ("vfl", 0.5, 1.0, "none")


def test_delete_marker_replaces_instead_of_merging(tmp_path):
    write(tmp_path / "base.yaml", "model: {head: {alpha: 0.5, gamma: 3.0}}\ndata: {subset: {categories: [car], "
                                  "max_images: 9}}\n")
    child = write(tmp_path / "child.yaml", "_base_: base.yaml\nmodel: {head: {_delete_: true, gamma: 1.0}}\n"
                                           "data: {subset: {_delete_: true}}\n")
    cfg = load_config(child)
    assert (cfg.model.head["alpha"], cfg.model.head["gamma"]) == (0.25, 1.0)
    assert cfg.data.subset == Config().data.subset
    assert load_config(tmp_path / "base.yaml", ["model.head={_delete_: true}"]).model.head == Config().model.head


def test_set_a_section_merges_into_it_and_leaves_its_input_alone():
    tree = {"model": {"head": {"gamma": 2.0, "alpha": 0.25}}}
    assert apply_overrides(tree, ["model.head={gamma: 1.0}"]) == {"model": {"head": {"gamma": 1.0, "alpha": 0.25}}}
    assert tree == {"model": {"head": {"gamma": 2.0, "alpha": 0.25}}}


@pytest.mark.parametrize("override, match", [
    ("train.lr", "expected KEY=VALUE"),
    ("=3", "expected KEY=VALUE"),
    ("train.lr.x=3", "train.lr is a value, not a section"),
    ("train.lr=[1", r"--set train\.lr: value '\[1' is not valid YAML"),
])
def test_bad_set_raises_value_error(override, match):
    with pytest.raises(ValueError, match=match):
        apply_overrides({"train": {"lr": 0.1}}, [override])


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
    with pytest.raises(ValueError, match="not valid YAML"):  # no constructor for the tag: nothing is built
        load_config(write(tmp_path / "t.yaml", "train: !!python/object/apply:os.system [echo]\n"))


# ----------------------------------------------------------------------------------------------
# imports: only from a file the user passed, never from a checkpoint


@pytest.fixture
def head_module(tmp_path, monkeypatch):
    """A module in the working directory that registers a head and leaves a mark when imported."""
    from detfocal.utils.registry import HEADS

    name = f"cfg_heads_{uuid.uuid4().hex[:8]}"
    write(tmp_path / f"{name}.py", f"""
import pathlib
pathlib.Path("{name}.imported").touch()
from detfocal.modeling.heads import FocalClassificationHead
from detfocal.utils.registry import HEADS

@HEADS.register("{name}")
class Head(FocalClassificationHead):
    def __init__(self, in_channels, num_anchors, num_classes, prior_probability=0.01, norm_layer=None, *,
                 scale: float = 1.0):
        super().__init__(in_channels, num_anchors, num_classes, prior_probability, norm_layer)
""")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    HEADS.names()  # load the built-ins before taking the copy that is restored afterwards
    monkeypatch.setattr(HEADS, "_entries", dict(HEADS._entries))
    return name


def test_checkpoint_config_never_imports_its_imports(head_module, tmp_path):
    tree = {"imports": [head_module], "model": {"head": {"type": head_module}}}
    with pytest.raises(ValueError) as info:
        config_from_dict(tree)
    assert not (tmp_path / f"{head_module}.imported").exists() and head_module not in sys.modules
    assert str(info.value) == (
        f"model.head.type: '{head_module}' is not registered (registered: {HEADS.names()}); the config lists "
        f"imports ['{head_module}']: pass --import {head_module} on the command line (or use a config file that "
        f"lists it) to load it")


def test_load_config_imports_the_modules_of_the_file(head_module, tmp_path):
    config = write(tmp_path / "c.yaml", f"imports: [{head_module}]\nmodel: {{head: {{type: {head_module}}}}}\n")
    cfg = load_config(config, ["model.head.scale=2"])
    assert (tmp_path / f"{head_module}.imported").exists()
    assert cfg.model.head == {"type": head_module, "norm": "none", "prior_probability": 0.01, "scale": 2.0}
    # Once imported (as --import does), a checkpoint's config that names the head validates.
    assert config_from_dict(config_to_dict(cfg)) == cfg


def test_unregistered_types_say_how_to_load_them():
    # Other tests may register heads of their own: only the built-ins are certain.
    with pytest.raises(ValueError, match=r"^model\.head\.type: 'fcos' is not registered \(registered: \[[^\]]*'focal'"
                                         r"[^\]]*'qfl'[^\]]*'vfl'[^\]]*\]\); pass --import MODULE on the command line"):
        config_from_dict({}, ["model.head.type=fcos"])
    with pytest.raises(ValueError, match=r"^model\.backbone: 'resnet9' is not registered \(registered: \[.*'resnet18'"):
        config_from_dict({}, ["model.backbone=resnet9"])
    with pytest.raises(ValueError, match=r"^model\.type: 'yolo' is not registered \(registered: \[[^\]]*'retinanet'[^\]]*\]\)"):
        config_from_dict({}, ["model.type=yolo"])


def test_import_errors_name_the_module():
    with pytest.raises(ValueError, match="imports: cannot import 'no_such_module_xyz'"):
        import_modules(["no_such_module_xyz"])


# ----------------------------------------------------------------------------------------------
# Config -> keyword arguments


def test_shapes_section_is_checked_against_generate():
    with pytest.raises(ValueError, match=r"^unknown key data\.shapes\.num_images \(did you mean data\.shapes\.\w+\?\); "
                                         r"allowed keys in data\.shapes: root, num_train"):
        config_from_dict({}, ["data.shapes={num_images: 5}"])
    with pytest.raises(ValueError, match=r"^data\.shapes\.num_train: expected int, got 'many'"):
        config_from_dict({}, ["data.shapes={num_train: many}"])
    assert config_from_dict({}, ["data.shapes={num_train: 3}"]).data.shapes == {"num_train": 3}  # no defaults added


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
    assert kwargs["head"]["type"] == "focal" and kwargs["head"] is not cfg.model.head
    assert isinstance(kwargs["anchor_sizes"], list) and isinstance(kwargs["anchor_sizes"][0], list)
    assert kwargs["score_thresh"] == cfg.eval.score_thresh
    assert optimizer_kwargs(cfg)["name"] == cfg.train.optimizer
    assert scheduler_kwargs(cfg)["schedule"] == cfg.train.schedule.type
