"""The train case: torchvision's stock RetinaNet against detfocal's, the same architecture and weights."""
from __future__ import annotations

from typing import Any

from .timing import fmt, time_call

def torchvision_twin(model: Any) -> Any:
    """torchvision's stock ``RetinaNet`` with ``model``'s architecture and weights.

    Stock everywhere detfocal differs: ``AnchorGenerator`` (anchors rebuilt every step),
    per-image matching in ``RetinaNet.compute_loss``, ``RetinaNetClassificationHead`` (one-hot
    focal loss per image) and ``LastLevelP6P7``; the backbone, FPN and head convolutions are
    the same modules with the same weights.
    """
    import copy

    from torchvision.models.detection import RetinaNet
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.retinanet import RetinaNetHead
    from torchvision.ops.feature_pyramid_network import LastLevelP6P7

    from detfocal.modeling.retinanet import infer_norm_layer

    body = copy.deepcopy(model.backbone)
    extra = body.fpn.extra_blocks
    if isinstance(extra, LastLevelP6P7) and type(extra) is not LastLevelP6P7:
        body.fpn.extra_blocks = LastLevelP6P7(extra.p6.in_channels, extra.p6.out_channels)
    classification = model.head.classification_head
    num_anchors = model.anchor_generator.num_anchors_per_location()[0]
    num_classes = classification.cls_logits.out_channels // num_anchors
    head = RetinaNetHead(classification.cls_logits.in_channels, num_anchors, num_classes,
                         norm_layer=infer_norm_layer(classification.conv[0]) if len(classification.conv) else None)
    head.classification_head.conv = copy.deepcopy(classification.conv)  # torchvision fixes 4 convs; ours may differ
    stock = RetinaNet(body, num_classes, min_size=model.transform.min_size, max_size=model.transform.max_size,
                      anchor_generator=AnchorGenerator(model.anchor_generator.sizes,
                                                       model.anchor_generator.aspect_ratios),
                      head=head, fg_iou_thresh=model.proposal_matcher.high_threshold,
                      bg_iou_thresh=model.proposal_matcher.low_threshold, score_thresh=model.score_thresh,
                      nms_thresh=model.nms_thresh, detections_per_img=model.detections_per_img,
                      topk_candidates=model.topk_candidates, image_mean=model.transform.image_mean,
                      image_std=model.transform.image_std)
    result = stock.load_state_dict(model.state_dict(), strict=False)
    unexpected = [key for key in result.unexpected_keys if key != "head.classification_head.num_foreground_ema"]
    if result.missing_keys or unexpected:
        raise RuntimeError(f"torchvision twin: missing {result.missing_keys}, unexpected {result.unexpected_keys}")
    return stock.train(model.training)


def train_model(spec: dict[str, Any]) -> tuple[Any, int, int, int]:
    """(detfocal model, image size, batch, classes) of a train spec: a named backbone or a config."""
    from detfocal.modeling.retinanet import build_retinanet

    if spec.get("config"):
        from detfocal.config import load_config, model_kwargs
        from detfocal.utils.registry import DETECTORS

        cfg = load_config(spec["config"])
        from detfocal.data.shapes import CATEGORIES

        num_classes = len(CATEGORIES)
        model = DETECTORS.build({"type": cfg.model.type, **model_kwargs(cfg, num_classes)})
        return model, cfg.model.min_size, spec["batch"], num_classes
    size, num_classes = spec["size"], 80
    model = build_retinanet(num_classes, backbone=spec["backbone"], min_size=size, max_size=size,
                            head={"type": "focal"})
    return model, size, spec["batch"], num_classes


def train_case(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    from detfocal.engine.precision import resolve_amp

    torch.manual_seed(0)
    device = spec["device"]
    model, size, batch, num_classes = train_model(spec)
    if spec["impl"] == "torchvision":
        model = torchvision_twin(model)
    # "default" is what train.amp: auto picks on this machine, the same call the training loop makes.
    amp_dtype, channels_last, note = resolve_amp("off" if spec["precision"] == "fp32" else "auto",
                                                 torch.device(device))
    model = model.to(device).train()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.001, momentum=0.9)
    scaler = torch.amp.GradScaler(device, enabled=amp_dtype == torch.float16)
    generator = torch.Generator().manual_seed(0)
    images = [torch.rand(3, size, size, generator=generator).to(device) for _ in range(batch)]
    targets = []
    for _ in range(batch):
        xy = torch.rand(4, 2, generator=generator) * size * 0.6
        wh = size / 8 + torch.rand(4, 2, generator=generator) * size * 0.3
        targets.append({"boxes": torch.cat([xy, xy + wh], 1).to(device),
                        "labels": torch.randint(0, num_classes, (4,), generator=generator).to(device)})

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            losses = model(images, targets)
        scaler.scale(sum(losses.values())).backward()
        scaler.step(optimizer)
        scaler.update()

    step()  # warm-up (and compile, where the loss compiles)
    first, median_ms, extra_mb = time_call(step, spec["repeats"], device)
    return {"median_ms": median_ms, "images_per_s": batch / (median_ms / 1000), "peak_extra_mb": extra_mb,
            "amp": str(amp_dtype).replace("torch.", "") if amp_dtype else "fp32",
            "auto_note": note if spec["precision"] == "default" else resolve_amp("auto", torch.device(device))[2]}


def train_table(rows: list[dict[str, Any]]) -> str:
    """Rows of (torchvision, detfocal) pairs as markdown, plus each model's default precision against fp32."""
    lines = ["| model | px | batch | precision | torchvision img/s | detfocal img/s | ratio |",
             "|---|---:|---:|---|---:|---:|---:|"]
    fp32_stock: dict[str, float] = {}
    notes = []
    for stock, ours in zip(rows[0::2], rows[1::2]):
        name = stock.get("model") or stock["backbone"]
        s, o = stock.get("images_per_s"), ours.get("images_per_s")
        precision = ours.get("amp") or stock["precision"]
        lines.append(f"| {name} | {stock['size']} | {stock['batch']} | {precision} | {fmt(s, '{:.2f}')} | "
                     f"{fmt(o, '{:.2f}')} | {fmt(o / s if s and o else None, '{:.2f}')} |")
        if stock["precision"] == "fp32" and s:
            fp32_stock[name] = s
        elif o and fp32_stock.get(name):
            notes.append(f"{name}: detfocal in the default precision ({precision}) is "
                         f"{o / fp32_stock[name]:.2f}x torchvision in fp32")
    if rows and not any(r["precision"] == "default" for r in rows):
        note = next((r.get("auto_note") for r in rows if r.get("auto_note")), "")
        notes.append("The default precision here is fp32 (train.amp: auto" +
                     (f"; {note.split('(', 1)[1].rstrip(')')}" if "(" in note else "") + "), so fp32 is the only row.")
    return "\n".join(lines + [""] + notes)
