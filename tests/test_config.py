"""detfocal.config: YAML 1.2 -> frozen pydantic models, _base_ inheritance, --set overrides; and
detfocal.modeling.validate, which checks the model section against the registered classes."""
from __future__ import annotations

import inspect
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pydantic
import pytest

from detfocal.config import (Config, apply_overrides, config_from_dict, config_to_dict, config_to_yaml, data_paths,
                             import_modules, load_config, model_kwargs, optimizer_kwargs, parse_override_value,
                             scheduler_kwargs, shapes_kwargs)
from detfocal.modeling.validate import check_model_config
from detfocal.utils.registry import HEADS

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").rglob("*.yaml"))


def checked(tree: dict, overrides: list[str] = ()) -> Config:
    """``config_from_dict``, then the model checks that training runs first (``check_model_config``)."""
    cfg = config_from_dict(tree, overrides)
    check_model_config(config_to_dict(cfg)["model"], imports=cfg.imports)
    return cfg


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
    # The head's other parameters are left to the head's own defaults, applied when it is built.
    assert cfg.model.head == {"type": "focal", "norm": "none"}


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
        checked({}, ["model.head.gama=1.0"])
    with pytest.raises(ValueError, match=r"^unknown key model\.head\.alpha for head type 'qfl'.*: type, norm, "
                                         r"prior_probability, num_convs, beta"):
        checked({}, ["model.head={type: qfl, alpha: 0.5}"])


def test_head_values_are_checked_against_the_head_signature():
    with pytest.raises(ValueError, match=r"^model\.head\.gamma: expected float, got 'two' \(str\)$"):
        checked({}, ["model.head.gamma=two"])
    with pytest.raises(ValueError, match=r"^model\.head\.num_convs: expected int, got 2\.5"):
        checked({}, ["model.head.num_convs=2.5"])
    with pytest.raises(ValueError, match=r"^model\.head\.iou_weighted: expected bool, got 1"):
        checked({}, ["model.head={type: vfl, iou_weighted: 1}"])
    with pytest.raises(ValueError, match=r"^model\.head\.gamma: expected >= 0, got -1 \(int\)"):
        checked({}, ["model.head.gamma=-1"])
    with pytest.raises(ValueError, match=r"^model\.head\.prior_probability: expected < 1, got 1"):
        checked({}, ["model.head.prior_probability=1"])
    assert checked({}, ["model.head.alpha=null"]).model.head["alpha"] is None


def test_head_type_and_norm_are_checked_by_the_config_itself():
    # No model code needed: these fail at load time, before check_model_config.
    with pytest.raises(ValueError, match=r"^model\.head\.norm: expected 'none', 'gn' or 'bn', got 'ln'"):
        config_from_dict({}, ["model.head.norm=ln"])
    with pytest.raises(ValueError, match=r"^model\.head\.type: expected str, got 3"):
        config_from_dict({}, ["model.head.type=3"])


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
    cfg = checked({}, ["train.lr=1", "model.head.gamma=0"])
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert cfg.model.head["gamma"] == 0


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
    assert vfl == {"type": "vfl", "norm": "none"}  # vfl's own defaults apply, not the focal head's values
    child = write(tmp_path / "child.yaml", "_base_: base.yaml\nmodel: {head: {type: qfl, beta: 1.5}}\n")
    assert load_config(child).model.head == {"type": "qfl", "norm": "none", "beta": 1.5}
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
    assert cfg.model.head == {"type": "focal", "norm": "none", "gamma": 1.0}
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
        checked(tree)
    assert not (tmp_path / f"{head_module}.imported").exists() and head_module not in sys.modules
    assert str(info.value) == (
        f"model.head.type: '{head_module}' is not registered (registered: {HEADS.names()}); the config lists "
        f"imports ['{head_module}']: pass --import {head_module} on the command line (or use a config file that "
        f"lists it) to load it")


def test_load_config_imports_the_modules_of_the_file(head_module, tmp_path):
    config = write(tmp_path / "c.yaml", f"imports: [{head_module}]\nmodel: {{head: {{type: {head_module}}}}}\n")
    cfg = load_config(config, ["model.head.scale=2.0"])
    assert (tmp_path / f"{head_module}.imported").exists()
    assert cfg.model.head == {"type": head_module, "norm": "none", "scale": 2.0}
    # Once imported (as --import does), a checkpoint's config that names the head validates.
    assert checked(config_to_dict(cfg)) == cfg
    with pytest.raises(ValueError, match=r"^model\.head\.scale: expected float, got 'x'"):
        checked(config_to_dict(cfg), ["model.head.scale=x"])
    with pytest.raises(ValueError, match=rf"^model\.backbone: 'resnet9' is not registered .*; none of the imports "
                                         rf"\['{head_module}'\] registers it$"):
        checked(config_to_dict(cfg), ["model.backbone=resnet9"])


def test_unregistered_types_say_how_to_load_them():
    # Other tests may register heads of their own: only the built-ins are certain.
    with pytest.raises(ValueError, match=r"^model\.head\.type: 'fcos' is not registered \(registered: \[[^\]]*'focal'"
                                         r"[^\]]*'qfl'[^\]]*'vfl'[^\]]*\]\); pass --import MODULE on the command line"):
        checked({}, ["model.head.type=fcos"])
    with pytest.raises(ValueError, match=r"^model\.backbone: 'resnet9' is not registered \(registered: \[.*'resnet18'"):
        checked({}, ["model.backbone=resnet9"])
    with pytest.raises(ValueError, match=r"^model\.type: 'yolo' is not registered \(registered: "
                                         r"\[[^\]]*'retinanet'[^\]]*\]\)"):
        checked({}, ["model.type=yolo"])


def test_validation_imports_no_model_code():
    # The config layer sits below the data and the model: loading a config (without imports)
    # leaves torch, detfocal.data and detfocal.modeling unimported, and generates no data.
    code = f"""
import sys
from detfocal.config import data_paths, load_config
cfg = load_config({str(ROOT / 'configs' / 'shapes_retinanet_r18.yaml')!r}, ["data.shapes.root=/nonexistent/shapes"])
data_paths(cfg.data)
print(sorted(m for m in sys.modules if m == "torch" or m.startswith(("detfocal.modeling", "detfocal.data"))))
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
    assert not Path("/nonexistent/shapes").exists()


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
    cfg = config_from_dict({}, [f"data.shapes={{root: {tmp_path / 'shapes'}}}", "data.val.images=/elsewhere"])
    paths = data_paths(cfg.data)
    root = tmp_path / "shapes"
    assert paths["train"] == (str(root / "train"), str(root / "annotations" / "instances_train.json"))
    assert paths["val"] == ("/elsewhere", str(root / "annotations" / "instances_val.json"))
    assert not root.exists()  # computing the paths generates nothing
    with pytest.raises(ValueError, match="data.train: needs 'images' and 'annotations'"):
        data_paths(Config().data)


def test_data_paths_are_where_ensure_dataset_writes_the_shapes(tmp_path):
    from detfocal.data.shapes import ensure_dataset

    cfg = config_from_dict({}, [f"data.shapes={{root: {tmp_path}, num_train: 2, num_val: 1, image_size: 32, "
                                "min_object_size: 4, max_objects: 1}"])
    written = ensure_dataset(**shapes_kwargs(cfg))
    assert data_paths(cfg.data) == {split: (str(written[f"{split}_images"]), str(written[f"{split}_annotations"]))
                                    for split in ("train", "val")}
    assert len(list((tmp_path / "train").glob("*.png"))) == 2
    assert shapes_kwargs(config_from_dict({}, ["data.shapes={num_val: 3}"])) == {"root": "data/shapes", "num_val": 3}
    assert shapes_kwargs(Config()) is None


def test_shapes_schema_defaults_are_those_of_generate():
    from detfocal.config.schema import ShapesConfig
    from detfocal.data.shapes import generate

    parameters = inspect.signature(generate).parameters
    assert list(ShapesConfig.model_fields) == ["root", *[name for name in parameters if name != "out_dir"]]
    for name, field in ShapesConfig.model_fields.items():
        if name != "root":
            assert field.default == parameters[name].default, name


def test_kwargs_mappers_give_plain_values():
    cfg = load_config(ROOT / "configs" / "shapes_retinanet_r18.yaml")
    kwargs = model_kwargs(cfg, num_classes=5)
    assert kwargs["num_classes"] == 5 and kwargs["backbone"] == "resnet18"
    assert kwargs["head"]["type"] == "focal" and kwargs["head"] is not cfg.model.head
    assert isinstance(kwargs["anchor_sizes"], list) and isinstance(kwargs["anchor_sizes"][0], list)
    assert kwargs["score_thresh"] == cfg.eval.score_thresh
    assert optimizer_kwargs(cfg)["name"] == cfg.train.optimizer
    assert scheduler_kwargs(cfg)["schedule"] == cfg.train.schedule.type


# ----------------------------------------------------------------------------------------------
# The schema documents itself: a description for every key, a bound for every integer


def _sections() -> list[type[pydantic.BaseModel]]:
    from detfocal.config import schema

    return [value for value in vars(schema).values()
            if isinstance(value, type) and issubclass(value, schema.Section) and value is not schema.Section]


def test_every_key_has_a_description():
    for section in _sections():
        for name, field in section.model_fields.items():
            assert field.description and len(field.description) > 10, f"{section.__name__}.{name}"


def test_every_integer_key_has_an_upper_bound():
    # Sizes, counts and seeds: a typo (or 5000 digits) fails at load time, not in an allocation.
    from detfocal.config.schema import ShapesConfig

    def unbounded(node, path):
        if isinstance(node, dict):
            if node.get("type") == "integer" and "maximum" not in node and "exclusiveMaximum" not in node:
                yield path
            for key, child in node.items():
                yield from unbounded(child, f"{path}.{key}")
        elif isinstance(node, list):
            for index, child in enumerate(node):
                yield from unbounded(child, f"{path}[{index}]")

    for section in (Config, ShapesConfig):
        assert list(unbounded(section.model_json_schema(), section.__name__)) == []


# ----------------------------------------------------------------------------------------------
# Defects a user met: each is now one line naming the key, the value and the limit


def test_duplicate_yaml_keys_are_refused_with_the_key_and_its_lines(tmp_path):
    # With PyYAML's default the second train: section silently dropped every key of the first.
    config = write(tmp_path / "c.yaml", "train:\n  lr: 0.1\n  epochs: 3\nmodel: {}\ntrain:\n  batch_size: 4\n")
    with pytest.raises(ValueError) as info:
        load_config(config)
    assert str(info.value) == (f"config {config} is not valid YAML (duplicate key 'train' on line 5, first on line 1; "
                               "YAML 1.2 forbids duplicate keys: merge them into one)")
    with pytest.raises(ValueError, match=r"duplicate key 'lr' on line 1, first on line 1"):
        load_config(write(tmp_path / "flow.yaml", "train: {lr: 0.1, lr: 0.2}\n"))
    with pytest.raises(ValueError, match=r"^--set model\.head: .*duplicate key 'gamma'"):
        config_from_dict({}, ["model.head={gamma: 1, gamma: 2}"])


@pytest.mark.parametrize("override, message", [
    ("model.min_size=4097", "model.min_size: expected <= 4096, got 4097 (int)"),
    ("model.max_size=100000", "model.max_size: expected <= 4096, got 100000 (int)"),
    ("model.fpn_channels=8192", "model.fpn_channels: expected <= 4096, got 8192"),
    ("model.num_classes=1000000", "model.num_classes: expected <= 100000, got 1000000"),
    ("model.anchor_sizes=[[16, 99999], 32, 64, 128, 256]", "model.anchor_sizes[0][1]: expected <= 8192, got 99999"),
    ("train.batch_size=4097", "train.batch_size: expected <= 4096, got 4097 (int)"),
    ("train.seed=4294967296", "train.seed: expected < 4294967296, got 4294967296 (int)"),
    ("train.seed=-1", "train.seed: expected >= 0, got -1 (int)"),
    ("train.epochs=10001", "train.epochs: expected <= 10000, got 10001"),
    ("train.max_iters=100000001", "train.max_iters: expected <= 100000000, got 100000001"),
    ("eval.batch_size=4097", "eval.batch_size: expected <= 4096, got 4097"),
    ("data.workers=257", "data.workers: expected <= 256 or 'auto', got 257"),
    ("data.shapes={image_size: 8192}", "data.shapes.image_size: expected <= 4096, got 8192"),
    ("data.shapes={num_train: 1000000}", "data.shapes.num_train: expected <= 100000, got 1000000"),
    ("data.shapes={num_val: 1000000}", "data.shapes.num_val: expected <= 100000, got 1000000"),
    ("data.shapes={max_objects: 1000}", "data.shapes.max_objects: expected <= 100, got 1000"),
    ("data.shapes={seed: 4294967296}", "data.shapes.seed: expected < 4294967296, got 4294967296"),
    ("data.shapes={image_size: 64, min_object_size: 40}",
     "data.shapes.min_object_size: expected <= data.shapes.image_size / 2 = 32, got 40"),
])
def test_sizes_counts_and_seeds_have_upper_bounds_checked_at_load_time(override, message):
    with pytest.raises(ValueError) as info:
        config_from_dict({}, [override])
    assert str(info.value).startswith(message), str(info.value)


def test_a_5000_digit_integer_is_one_line_naming_the_key(tmp_path, capsys):
    from detfocal.cli import main as cli_main

    digits = "9" * 5000
    config = write(tmp_path / "c.yaml", f"train:\n  batch_size: {digits}\n")
    with pytest.raises(ValueError) as info:
        load_config(config)
    assert str(info.value) == (f"config {config}: train.batch_size: expected an integer of at most 20 digits, "
                               "got 99999999999999999999...9999 (5000 digits)")
    with pytest.raises(ValueError, match=r"^--set train\.seed: .*expected an integer of at most 20 digits, got 9+\.\.\."
                                         r"9999 \(5000 digits\)$"):
        config_from_dict({}, [f"train.seed={digits}"])
    with pytest.raises(ValueError, match=r"^config: model\.anchor_sizes\[0\]: expected an integer of at most 20 "
                                         r"digits, got an integer of about 5000 digits$"):
        config_from_dict({"model": {"anchor_sizes": [10 ** 5000]}})  # e.g. from a checkpoint
    assert cli_main(["train", str(config), "--print-config"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: config {config}: train.batch_size: ")
    assert parse_override_value("-" + "0" * 30 + "7") == -7  # leading zeros are no digits of the value


def test_unknown_key_in_an_optional_section_is_one_line():
    with pytest.raises(ValueError, match=r"^unknown key train\.ema\.deacy \(did you mean train\.ema\.decay\?\); "
                                         r"allowed keys in train\.ema: decay, warmup_iters$"):
        config_from_dict({}, ["train.ema={deacy: 0.99}"])


def test_set_key_deeper_than_any_config_key_is_one_line():
    with pytest.raises(ValueError) as info:
        config_from_dict({}, ["a" + ".a" * 2999 + "=1"])
    assert str(info.value).endswith("a key of 3000 dotted parts, deeper than any config key (at most 32 levels)")
    assert "\n" not in str(info.value) and len(str(info.value)) < 200


@pytest.mark.parametrize("body, kind", [("def broken(:\n", "SyntaxError"),
                                        ("raise RuntimeError('registry is closed')\n", "RuntimeError"),
                                        ("import no_such_module_xyz\n", "ModuleNotFoundError")])
def test_import_of_a_failing_module_is_one_line_naming_it_and_the_error(tmp_path, monkeypatch, body, kind):
    name = f"cfg_broken_{uuid.uuid4().hex[:8]}"
    write(tmp_path / f"{name}.py", body)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    with pytest.raises(ValueError) as info:
        import_modules([name])
    assert str(info.value).startswith(f"imports: cannot import '{name}' ({kind}: ") and "\n" not in str(info.value)
    with pytest.raises(ValueError, match=f"cannot import '{name}' \\({kind}: "):  # a config's imports alike
        load_config(write(tmp_path / "c.yaml", f"imports: [{name}]\n"))


def test_a_directory_as_config_or_base_is_named_a_directory(tmp_path):
    (tmp_path / "configs").mkdir()
    with pytest.raises(IsADirectoryError, match=f"^config file {tmp_path / 'configs'} is a directory; expected a "
                                                "YAML file$"):
        load_config(tmp_path / "configs")
    child = write(tmp_path / "child.yaml", "_base_: configs\n")
    with pytest.raises(IsADirectoryError, match=f"^_base_ of config {child}: {tmp_path / 'configs'} is a directory"):
        load_config(child)


def test_a_binary_config_names_the_file(tmp_path):
    config = tmp_path / "model.pth"
    config.write_bytes(b"PK\x03\x04\x80\xff" + bytes(range(256)))
    with pytest.raises(ValueError, match=f"^config file {config} is not UTF-8 text \\(byte 4 is 0x80\\); expected a "
                                         "YAML file$"):
        load_config(config)


# ----------------------------------------------------------------------------------------------
# A config that validates also runs its first forward: GroupNorm and BatchNorm on the 1x1 P7 map


@pytest.mark.parametrize("overrides, message", [
    (["model.fpn_channels=48"], r"^model\.fpn_channels: expected a multiple of 32 with model\.head\.norm 'gn' "
                                r"\(GroupNorm splits the channels into 32 groups\), got 48$"),
    (["model.fpn_channels=16"], r"^model\.fpn_channels: expected a multiple of 32 .*, got 16$"),
    (["model.fpn_channels=32"], r"^model\.fpn_channels: expected >= 64 with model\.head\.norm 'gn' and images of at "
                                r"most 128 px \(model\.min_size 128, max_size 128\), got 32: GroupNorm then has one "
                                r"channel per group, and on the 1x1 P7 map of a one-image batch"),
    (["model.head.norm=bn", "train.batch_size=1"], r"^train\.batch_size: expected >= 2 with model\.head\.norm 'bn' "
                                                   r"and images of at most 128 px"),
])
def test_head_norms_that_cannot_run_a_one_image_batch_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        load_config(ROOT / "configs" / "shapes_retinanet_r18.yaml", overrides)  # its head has norm: gn


def test_the_norm_limits_are_those_of_torch(one_thread):
    # The reference is torch itself: what the checks refuse fails a one-image forward, and the
    # settings just inside the limits run one.
    import torch

    from detfocal.config.schema import GN_GROUPS
    from detfocal.modeling import build_retinanet
    from detfocal.modeling.retinanet import HEAD_NORMS

    assert HEAD_NORMS["gn"].args == (GN_GROUPS,)

    def forward(overrides: list[str], *, train: bool = False, images: int = 1, **change) -> None:
        kwargs = model_kwargs(load_config(ROOT / "configs" / "shapes_retinanet_r18.yaml", overrides), 2) | change
        model = build_retinanet(**kwargs).train(train)
        size = kwargs["min_size"]
        targets = [{"boxes": torch.tensor([[4.0, 4.0, 40.0, 40.0]]), "labels": torch.tensor([1])}] * images
        model([torch.rand(3, size, size)] * images, targets if train else None)

    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        forward([], fpn_channels=32)  # the demo (gn, 128 px) at 32 channels, which the config refuses
    forward(["model.fpn_channels=64"])
    forward(["model.fpn_channels=32", "model.min_size=160", "model.max_size=160"])
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        forward(["model.head.norm=bn"], train=True)  # what train.batch_size=1 would run
    forward(["model.head.norm=bn"], train=True, images=2)
    forward(["model.head.norm=bn"])
