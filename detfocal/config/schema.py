"""The schema: one frozen pydantic model per section, each key typed, bounded and described.

Types and ranges are checked from these annotations, missing keys take the defaults, and the
``description`` of each field is the key's documentation (the docs' config reference is
generated from it). Every size, count and seed has an upper bound, so a typo or a 5000-digit
number fails at load time naming the key, not later in an allocation or a seeding call.

Checks here need only the config's own values: whether a type is registered and whether the
head's parameters fit its signature need the model code, and ``detfocal.modeling.validate``
checks them before any work.
"""
from __future__ import annotations

import math
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, Strict, ValidationInfo, field_validator,
                      model_validator)

from detfocal.config.errors import ConfigError, validate

__all__ = ["AugmentConfig", "Config", "DataConfig", "EmaConfig", "EvalConfig", "FromList", "HeadKeys", "ModelConfig",
           "ScheduleConfig", "Section", "ShapesConfig", "SplitConfig", "SubsetConfig", "TrainConfig"]

# Upper bounds: far above any sensible setting, and low enough that an allocation, a seeding
# call or a loop sized by the value cannot fail or run for hours first.
MAX_IMAGE_SIZE = 4096          # pixels, an image side
MAX_ANCHOR_SIZE = 8192         # pixels: anchors may exceed the image (the demo's P7 ones do)
MAX_CHANNELS = 4096
MAX_CLASSES = 100_000          # V3Det has 13,204; LVIS 1,203
MAX_IMAGES = 10_000_000        # a split (Open Images has 1.7M training images)
MAX_BATCH_SIZE = 4096
MAX_EPOCHS = 10_000
MAX_ITERS = 100_000_000
SEED_LIMIT = 2 ** 32           # seeds lie in [0, 2**32): NumPy's legacy seeding refuses more
MAX_WORKERS = 256
MAX_DETECTIONS = 10_000        # per image; COCO keeps 100, LVIS 300
MAX_STAGES = 16                # backbone stages; each backbone checks its own range on build
MAX_ITEMS = 16                 # anchor levels, sizes per level, aspect ratios
MAX_SHAPES_IMAGES = 100_000    # per split of the generated shapes set: about 2 GB at 128 px
MAX_SHAPES_OBJECTS = 100
GN_GROUPS = 32                 # the head's GroupNorm (modeling.retinanet_head.HEAD_NORMS["gn"])
P7_STRIDE = 128                # images of at most this many pixels a side give a 1x1 P7 map
DEFAULT_SHAPES_ROOT = "data/shapes"

_T = TypeVar("_T")
FromList = Annotated[_T, Strict(False)]  # a tuple that takes a YAML list (its items stay strict)
UnitFloat = Annotated[float, Field(ge=0, le=1)]
Seed = Annotated[int, Field(ge=0, lt=SEED_LIMIT)]
Iterations = Annotated[int, Field(ge=0, le=MAX_ITERS)]
Pixels = Annotated[int, Field(gt=0, le=MAX_IMAGE_SIZE)]
AnchorSize = Annotated[int, Field(gt=0, le=MAX_ANCHOR_SIZE)]
AnchorLevel = AnchorSize | FromList[Annotated[tuple[AnchorSize, ...], Field(max_length=MAX_ITEMS)]]  # one or a list


def _increasing(steps: tuple[int, ...]) -> tuple[int, ...]:
    if list(steps) != sorted(set(steps)):
        raise ValueError("strictly increasing iterations")
    return steps


class Section(BaseModel):
    """A config section: unknown keys, wrong types and non-finite floats are errors; frozen once loaded."""
    # arbitrary_types_allowed: a head's signature (modeling.validate) may name its own classes.
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False,
                              arbitrary_types_allowed=True)


class HeadKeys(Section):
    """The keys every head has; the others are the head's own parameters."""
    type: str = Field("focal", description="A HEADS entry: focal, qfl, vfl, or one an import registers.")
    norm: Literal["none", "gn", "bn"] = Field(
        "none", description=f"Normalisation after each conv of both subnets: none, gn (GroupNorm, {GN_GROUPS} groups) "
                            "or bn (BatchNorm).")


class ModelConfig(Section):
    type: str = Field("retinanet", description="The detector: a DETECTORS entry (built-in: retinanet).")
    backbone: str = Field("resnet50", description="A BACKBONES entry: resnet18, resnet34, resnet50, resnet101, "
                                                  "mobilenet_v3_large, or one an import registers.")
    weights_backbone: str | None = Field(
        None, description="Pretrained backbone weights: a torchvision name such as ResNet50_Weights.IMAGENET1K_V1 "
                          "(downloaded) or a local .pth state dict; null trains the backbone from scratch.")
    weights: str | None = Field(
        None, description="A whole detector to start from (fine-tuning): a torchvision RetinaNet state dict, a "
                          "detfocal checkpoint or best.pth; a classification layer of another class count is "
                          "re-initialised. null: none.")
    trainable_backbone_layers: Annotated[int, Field(ge=0, le=MAX_STAGES)] | None = Field(
        None, description="Backbone stages left trainable, counted from the top (ResNets: 0-5); null: 3 with "
                          f"pretrained weights, all from scratch. At most {MAX_STAGES}.")
    num_classes: Annotated[int, Field(gt=0, le=MAX_CLASSES)] | None = Field(
        None, description="Foreground classes, labels in [0, num_classes); null: counted from the training "
                          f"annotations. At most {MAX_CLASSES}.")
    min_size: Pixels = Field(800, description=f"Shorter image side after resizing, in pixels (at most "
                                              f"{MAX_IMAGE_SIZE}).")
    max_size: Pixels = Field(1333, description=f"Cap on the longer image side after resizing, in pixels (at most "
                                               f"{MAX_IMAGE_SIZE}).")
    anchor_sizes: FromList[Annotated[tuple[AnchorLevel, ...], Field(max_length=MAX_ITEMS)]] | None = Field(
        None, description="Anchor sizes in pixels, one entry per FPN level (P3-P7): a size or a list of sizes "
                          f"(at most {MAX_ANCHOR_SIZE} px, {MAX_ITEMS} per level). null: torchvision's 32-512, three "
                          "octave scales per level.")
    aspect_ratios: FromList[Annotated[tuple[Annotated[float, Field(gt=0)], ...], Field(max_length=MAX_ITEMS)]] = Field(
        (0.5, 1.0, 2.0), description=f"Anchor height/width ratios, the same at every level (at most {MAX_ITEMS}).")
    fpn_channels: Annotated[int, Field(gt=0, le=MAX_CHANNELS)] = Field(
        256, description=f"Channels of the FPN and the heads (at most {MAX_CHANNELS}). With head norm gn: a multiple "
                         f"of {GN_GROUPS}, and at least {2 * GN_GROUPS} when images can be {P7_STRIDE} px or smaller.")
    fg_iou_thresh: Annotated[float, Field(gt=0, le=1)] = Field(
        0.5, description="Anchors with IoU >= this to a box are foreground (paper, section 4: 0.5).")
    bg_iou_thresh: UnitFloat = Field(
        0.4, description="Anchors with IoU < this to every box are background, those in between ignored (paper: "
                         "0.4). At most fg_iou_thresh.")
    head: dict[str, Any] = Field(
        default_factory=lambda: {"type": "focal"}, validate_default=True,
        description="The classification head: type (a HEADS entry), norm (none, gn or bn; the box subnet's too) and "
                    "that head's keyword parameters, e.g. the focal head's alpha, gamma (paper, eq. 5), "
                    "normalization (batch, image or ema) and num_convs (paper: 4). Missing parameters take the "
                    "head's defaults; they are checked against its signature before training.")

    @field_validator("bg_iou_thresh")
    @classmethod
    def _below_fg(cls, value: float, info: ValidationInfo) -> float:
        if value > info.data.get("fg_iou_thresh", 1):
            raise ValueError(f"<= model.fg_iou_thresh ({info.data['fg_iou_thresh']})")
        return value

    @field_validator("head")
    @classmethod
    def _head_keys(cls, head: dict[str, Any]) -> dict[str, Any]:
        # Only type and norm here: the other keys belong to the head's signature (modeling.validate).
        keys = validate(HeadKeys, {key: head[key] for key in ("type", "norm") if key in head}, "model.head")
        _refuse_non_finite(head, "model.head")
        return {**keys.model_dump(), **{key: value for key, value in head.items() if key not in ("type", "norm")}}

    @model_validator(mode="after")
    def _group_norm_fits(self) -> ModelConfig:
        channels = self.fpn_channels
        if self.head["norm"] == "gn" and channels % GN_GROUPS:
            raise ConfigError(f"model.fpn_channels: expected a multiple of {GN_GROUPS} with model.head.norm 'gn' "
                              f"(GroupNorm splits the channels into {GN_GROUPS} groups), got {channels}")
        if self.head["norm"] == "gn" and channels == GN_GROUPS and _smallest_side(self) <= P7_STRIDE:
            raise ConfigError(
                f"model.fpn_channels: expected >= {2 * GN_GROUPS} with model.head.norm 'gn' and images of at most "
                f"{P7_STRIDE} px (model.min_size {self.min_size}, max_size {self.max_size}), got {channels}: "
                f"GroupNorm then has one channel per group, and on the 1x1 P7 map of a one-image batch (a last "
                f"batch, inference) one value per group, which it refuses")
        return self


def _refuse_non_finite(value: Any, key: str) -> None:
    """The sections' rule for floats, applied to the head's free-form parameters: nan and inf are refused."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{key}: expected a finite float, got {value!r} (float)")
    children = (value.items() if isinstance(value, dict) else
                enumerate(value) if isinstance(value, (list, tuple)) else ())
    for child_key, child in children:
        _refuse_non_finite(child, f"{key}[{child_key}]" if isinstance(child_key, int) else f"{key}.{child_key}")


def _smallest_side(model: ModelConfig) -> int:
    """The smallest that the longer side of a resized image can be (a square image's side)."""
    return min(model.min_size, model.max_size)


class SplitConfig(Section):
    images: str | None = Field(None, description="Folder that the annotations' file_name entries are relative to; "
                                                 "null: from data.shapes.")
    annotations: str | None = Field(None, description="COCO instances JSON file; null: from data.shapes.")


class SubsetConfig(Section):
    """Applied on load to both splits."""
    categories: FromList[Annotated[tuple[str | Annotated[int, Field(ge=-2 ** 63, lt=2 ** 63)], ...],
                                   Field(max_length=MAX_CLASSES)]] | None = Field(
        None, description=f"Categories to keep, by name or id (at most {MAX_CLASSES}); null keeps all.")
    max_images: Annotated[int, Field(gt=0, le=MAX_IMAGES)] | None = Field(
        None, description=f"Images kept per split, sampled with train.seed (at most {MAX_IMAGES}); null keeps all.")


class AugmentConfig(Section):
    hflip: UnitFloat = Field(0.5, description="Probability of flipping a training image horizontally.")
    scale_jitter: FromList[tuple[Annotated[float, Field(gt=0, le=10)], Annotated[float, Field(gt=0, le=10)]]] | None \
        = Field(None, description="(low, high): each training image is zoomed by a random factor in this range "
                                  "(at most 10); null: no zoom.")
    photometric: bool = Field(False, description="SSD-style photometric distortion (brightness, contrast, "
                                                 "saturation, hue, channel order).")


class ShapesConfig(Section):
    """``data.shapes``: the parameters of ``detfocal.data.shapes.generate`` plus ``root``; the defaults are
    ``generate``'s (a test keeps them equal), and only the keys given are kept in the config."""
    root: str = Field(DEFAULT_SHAPES_ROOT, description="Folder of the generated dataset, relative to the working "
                                                       "directory.")
    num_train: Annotated[int, Field(ge=0, le=MAX_SHAPES_IMAGES)] = Field(
        1500, description=f"Training images (at most {MAX_SHAPES_IMAGES}).")
    num_val: Annotated[int, Field(ge=0, le=MAX_SHAPES_IMAGES)] = Field(
        200, description=f"Validation images (at most {MAX_SHAPES_IMAGES}).")
    image_size: Annotated[int, Field(ge=32, le=MAX_IMAGE_SIZE)] = Field(
        128, description=f"Width and height of the square images, in pixels (32 to {MAX_IMAGE_SIZE}).")
    seed: Seed = Field(0, description="Generator seed in [0, 2**32): the same seed and parameters give "
                                      "byte-identical files.")
    max_objects: Annotated[int, Field(ge=1, le=MAX_SHAPES_OBJECTS)] = Field(
        6, description=f"Most objects per image (1 to {MAX_SHAPES_OBJECTS}).")
    min_object_size: Annotated[int, Field(ge=4, le=MAX_IMAGE_SIZE // 2)] = Field(
        8, description="Smallest object diameter in pixels (4 to image_size / 2); the largest is image_size / 2.")
    progress: bool = Field(False, description="Show a progress bar while generating.")

    @model_validator(mode="after")
    def _objects_fit(self) -> ShapesConfig:
        if 2 * self.min_object_size > self.image_size:
            raise ConfigError(f"data.shapes.min_object_size: expected <= data.shapes.image_size / 2 = "
                              f"{self.image_size // 2}, got {self.min_object_size}")
        return self


class DataConfig(Section):
    train: SplitConfig = Field(default_factory=SplitConfig, description="The training split.")
    val: SplitConfig = Field(default_factory=SplitConfig, description="The validation split.")
    subset: SubsetConfig = Field(default_factory=SubsetConfig, description="A subset of both splits.")
    shapes: dict[str, Any] | None = Field(
        None, description="Generate the embedded shapes dataset (keys: root, num_train, num_val, image_size, seed, "
                          "max_objects, min_object_size, progress) if missing, and fill the train/val paths left "
                          "null. null: no generated data.")
    augment: AugmentConfig = Field(default_factory=AugmentConfig, description="Training augmentation.")
    workers: Annotated[int, Field(ge=0, le=MAX_WORKERS)] | Literal["auto"] = Field(
        "auto", description=f"DataLoader processes (at most {MAX_WORKERS}); 0 decodes in the training process; auto "
                            "starts workers only where they save >= 5% of a step (engine/workers.py).")
    skip_bad_images: bool = Field(False, description="Skip (and count) undecodable images instead of stopping.")

    @field_validator("shapes")
    @classmethod
    def _shapes_keys(cls, shapes: dict[str, Any] | None) -> dict[str, Any] | None:
        # Only the keys given: generate's own defaults apply to the others.
        return None if shapes is None else validate(ShapesConfig, shapes, "data.shapes").model_dump(exclude_unset=True)


class ScheduleConfig(Section):
    type: Literal["step", "cosine"] = Field("step", description="step: lr *= gamma at each of steps; cosine: from lr "
                                                                "down to lr * min_lr_factor at the last iteration.")
    steps: Annotated[FromList[Annotated[tuple[Annotated[int, Field(gt=0, le=MAX_ITERS)], ...], Field(max_length=100)]],
                     AfterValidator(_increasing)] = Field(
        (), description=f"step: the iterations where the lr is multiplied by gamma, strictly increasing (each at most "
                    f"{MAX_ITERS}, at most 100 of them).")
    gamma: Annotated[float, Field(gt=0)] = Field(0.1, description="step: the lr factor at each of steps.")
    min_lr_factor: UnitFloat = Field(0.0, description="cosine: the final lr is lr * min_lr_factor.")


class EmaConfig(Section):
    """An exponential moving average of the weights, used for evaluation and best.pth."""
    decay: Annotated[float, Field(gt=0, lt=1)] = Field(0.9998, description="Weight of the average at each update.")
    warmup_iters: Iterations = Field(2000, description="The decay ramps as decay * (1 - exp(-updates / "
                                                       "warmup_iters)), so early averages follow the weights (at most "
                                                       f"{MAX_ITERS}).")


class TrainConfig(Section):
    epochs: Annotated[int, Field(gt=0, le=MAX_EPOCHS)] = Field(
        12, description=f"Passes over the training set (at most {MAX_EPOCHS}).")
    batch_size: Annotated[int, Field(gt=0, le=MAX_BATCH_SIZE)] = Field(
        2, description=f"Images per step and process; the global batch is batch_size * world size (at most "
                       f"{MAX_BATCH_SIZE}).")
    optimizer: Literal["sgd", "adamw"] = Field("sgd", description="sgd (with momentum) or adamw.")
    lr: Annotated[float, Field(gt=0)] = Field(0.01, description="The learning rate after warmup.")
    momentum: UnitFloat = Field(0.9, description="SGD momentum; AdamW beta1.")
    weight_decay: Annotated[float, Field(ge=0)] = Field(1e-4, description="Weight decay (AdamW: decoupled).")
    warmup_iters: Iterations = Field(500, description=f"Iterations of linear lr warmup (at most {MAX_ITERS}).")
    warmup_factor: Annotated[float, Field(gt=0, le=1)] = Field(
        0.001, description="The lr ramps linearly from lr * warmup_factor to lr.")
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig, description="The lr schedule after warmup.")
    grad_clip: Annotated[float, Field(gt=0)] | None = Field(None, description="Max total gradient norm; null: no "
                                                                              "clipping.")
    amp: Literal["auto", "off", "bf16", "fp16"] = Field(
        "auto", description="Mixed precision: auto is fp16 with a GradScaler on CUDA, bf16 on CPUs with native bf16, "
                            "else fp32; off is fp32.")
    seed: Seed = Field(0, description="Seed of every random generator, in [0, 2**32).")
    deterministic: bool = Field(False, description="Use deterministic algorithms only (slower).")
    log_interval: Annotated[int, Field(gt=0, le=MAX_ITERS)] = Field(
        20, description=f"Iterations between metrics.jsonl lines (at most {MAX_ITERS}).")
    max_iters: Annotated[int, Field(gt=0, le=MAX_ITERS)] | None = Field(
        None, description=f"Stop after this many iterations in all (tiny runs; at most {MAX_ITERS}); null: epochs "
                          "decide.")
    ema: EmaConfig | None = Field(None, description="Average the weights for evaluation and best.pth; null: no "
                                                    "averaging.")
    patience: Annotated[int, Field(gt=0, le=MAX_EPOCHS)] | None = Field(
        None, description=f"Stop after this many evaluations without a better val AP (at most {MAX_EPOCHS}); null: "
                          "never.")
    tensorboard: bool = Field(True, description="Write TensorBoard events to OUT/tensorboard (rank 0).")


class EvalConfig(Section):
    interval: Annotated[int, Field(gt=0, le=MAX_EPOCHS)] = Field(
        1, description=f"Epochs between evaluations (at most {MAX_EPOCHS}); the last epoch is always evaluated.")
    score_thresh: UnitFloat = Field(0.05, description="Detections scoring below this are dropped.")
    detections_per_img: Annotated[int, Field(gt=0, le=MAX_DETECTIONS)] = Field(
        100, description=f"Most detections kept per image, after NMS (at most {MAX_DETECTIONS}).")
    batch_size: Annotated[int, Field(gt=0, le=MAX_BATCH_SIZE)] = Field(
        4, description=f"Images per batch and process (at most {MAX_BATCH_SIZE}).")
    backend: Literal["auto", "pycocotools", "faster_coco_eval"] = Field(
        "auto", description="COCO evaluation library; auto: faster-coco-eval if installed, else pycocotools.")


class Config(Section):
    model: ModelConfig = Field(default_factory=ModelConfig, description="The detector.")
    data: DataConfig = Field(default_factory=DataConfig, description="The datasets and their loading.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="Optimisation and the training loop.")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="Evaluation on the val split.")
    imports: FromList[Annotated[tuple[Annotated[str, Field(pattern=r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")], ...],
                                Field(max_length=100)]] = Field(
        (), description="Modules that register heads, backbones or detectors (at most 100); load_config "
                        "imports them (never for a checkpoint's config).")

    @model_validator(mode="after")
    def _batch_norm_fits(self) -> Config:
        model = self.model
        if model.head["norm"] == "bn" and self.train.batch_size == 1 and _smallest_side(model) <= P7_STRIDE:
            raise ConfigError(
                f"train.batch_size: expected >= 2 with model.head.norm 'bn' and images of at most {P7_STRIDE} px "
                f"(model.min_size {model.min_size}, max_size {model.max_size}), got 1: BatchNorm in training needs "
                f"more than one value per channel, and the 1x1 P7 map of a one-image batch has one")
        return self
