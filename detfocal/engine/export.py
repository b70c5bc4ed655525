"""Export a trained detector to ONNX, and run the exported file with onnxruntime.

The whole inference path is in the graph, so the file alone turns an image into detections:
normalisation and resize (the model's ``GeneralizedRCNNTransform``), backbone, FPN, head,
anchors, box decoding, per-level top-k, score threshold, class-wise NMS, ``detections_per_img``
and the rescale of the boxes to the input image. Nothing is post-processed outside it.

The graph is made by PyTorch's TorchScript-based exporter (``dynamo=False``). The
``torch.export`` one (``dynamo=True``) stops at ``torchvision.ops.batched_nms``: the number of
boxes left after the score threshold depends on the data, and ``batched_nms`` branches on it.
torchvision's transform, anchor generator and post-processing have tracing paths for the
TorchScript exporter (its ``test_onnx.py`` covers RetinaNet), which keep the image size
dynamic in the traced graph.

The graph, for one image:

- input ``image``: float32 ``[3, H, W]``, RGB in [0, 1]; H and W are free unless exported with
  ``image_size`` (then ``[3, image_size, image_size]``); the graph resizes as the model does.
- outputs ``boxes`` float32 ``[N, 4]`` (x1, y1, x2, y2 in input pixels), ``scores`` float32
  ``[N]`` (descending) and ``labels`` int64 ``[N]`` in [0, num_classes), N <= detections_per_img.
- metadata ``category_names`` and ``label_to_category_id``: JSON lists indexed by label.
"""
from __future__ import annotations

import importlib
import io
import json
import os
import warnings
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch import Tensor, nn

__all__ = ["MAX_IMAGE_SIZE", "MAX_OPSET", "MIN_OPSET", "export_onnx", "run_onnx"]

# torchvision's NMS symbolic needs NonMaxSuppression and its RetinaNet export is tested from 11;
# 20 is the last opset of PyTorch's TorchScript-based exporter.
MIN_OPSET = 11
MAX_OPSET = 20
# px: a fixed input side above this only makes an example image and a graph too large to be useful.
MAX_IMAGE_SIZE = 4096
OUTPUT_NAMES = ("boxes", "scores", "labels")


class _DetectionGraph(nn.Module):
    """One image in, ``(boxes, scores, labels)`` out: the tensors the exporter needs instead of a list of dicts."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        detections = self.model([image])[0]
        return detections["boxes"], detections["scores"], detections["labels"]


def _require(module: str, needed_by: str) -> Any:
    """Import an optional dependency, or say in one line how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(f"{needed_by} needs the {module} package: pip install {module}") from None


def _check_output(out: Path, overwrite: bool) -> Path:
    """Refuse, before any work, an ``out`` that is a folder, exists (without ``overwrite``) or cannot be written."""
    import tempfile

    if out.is_dir():
        raise ValueError(f"--out {out} is a folder, expected an .onnx file")
    if out.exists() and not overwrite:
        raise ValueError(f"--out {out} exists; pass overwrite=True (--overwrite) to replace it")
    # The file is written next to itself and renamed (atomic_write), its missing folders created:
    # the nearest existing folder must take a new entry. Nothing is created here.
    folder = next(parent for parent in out.absolute().parents if parent.exists())
    if not folder.is_dir():
        raise ValueError(f"--out {out} cannot be written: {folder} is a file, not a folder")
    try:
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as exc:
        raise ValueError(f"--out {out} cannot be written: its folder {folder}: {exc.strerror or exc}") from None
    return out


def export_onnx(checkpoint: str | Path | Mapping[str, Any], out: str | Path, *, image_size: int | None = None,
                opset: int = 17, score_thresh: float | None = None, overwrite: bool = False) -> Path:
    """Export a training checkpoint's detector, post-processing and NMS included, to an ONNX file.

    The model is exported on the CPU in fp32, with the score threshold, NMS threshold and
    ``detections_per_img`` of the checkpoint's config (``eval`` section) unless
    ``score_thresh`` replaces the first. See the module docstring for the graph's inputs and
    outputs; :func:`run_onnx` runs it.

    Args:
        checkpoint: a checkpoint written by ``detfocal train``, or its loaded dict.
        out: the ``.onnx`` file to write (atomically; its folder is created). It is checked
            before any work: not a folder, not an existing file without ``overwrite``, and its
            folder writable.
        image_size: None for an input of any height and width; an int N in [1, MAX_IMAGE_SIZE]
            = [1, 4096] fixes the input to ``[3, N, N]``, which some runtimes optimise better.
            Either way the graph resizes
            the image to the model's ``min_size``/``max_size`` first, as PyTorch does.
        opset: ONNX opset, in [MIN_OPSET, MAX_OPSET] = [11, 20].
        score_thresh: lowest score kept, in [0, 1]; default the checkpoint's ``eval.score_thresh``.
        overwrite: replace ``out`` if it exists.

    Returns:
        The path written.

    Raises:
        FileNotFoundError: the checkpoint does not exist.
        ValueError: a bad ``image_size``, ``opset``, ``score_thresh`` or ``out`` (a folder, an
            existing file, an unwritable folder), or a checkpoint that is a folder or not a
            detfocal checkpoint.
        ImportError: the ``onnx`` package, which the exporter needs, is not installed.

    Example:
        >>> path = export_onnx("runs/shapes_retinanet_r18/best.pth", "model.onnx")
        >>> detections = run_onnx(path, load_image("shape.png"))  # {"boxes", "scores", "labels"}
    """
    from detfocal.engine.loading import load_model
    from detfocal.utils.io import atomic_write

    if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, int)
                                   or not 1 <= image_size <= MAX_IMAGE_SIZE):
        raise ValueError(f"image_size: expected None (any size) or an int in [1, {MAX_IMAGE_SIZE}] (pixels), "
                         f"got {image_size!r}")
    if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= MAX_OPSET:
        raise ValueError(f"opset: expected an int in [{MIN_OPSET}, {MAX_OPSET}], got {opset!r}")
    if score_thresh is not None and (isinstance(score_thresh, bool) or not isinstance(score_thresh, (int, float))
                                     or not 0.0 <= score_thresh <= 1.0):
        raise ValueError(f"score_thresh: expected a score in [0, 1], got {score_thresh!r}")
    out = _check_output(Path(out), overwrite)
    if not isinstance(checkpoint, Mapping) and out.exists() and Path(checkpoint).exists() and (
            out.resolve() == Path(checkpoint).resolve() or os.path.samefile(out, checkpoint)):
        raise ValueError(f"--out {out} is the checkpoint being exported; write the .onnx file elsewhere")
    onnx = _require("onnx", "ONNX export")  # the TorchScript exporter writes through it

    model, info = load_model(checkpoint, device="cpu",
                             **({} if score_thresh is None else {"score_thresh": float(score_thresh)}))
    # The example only sets the traced shapes; a seeded generator of its own leaves the global RNG alone.
    size = image_size if image_size is not None else model.transform.min_size[-1]
    example = torch.rand(3, size, size, generator=torch.Generator().manual_seed(0))
    dynamic = {name: {0: "num_detections"} for name in OUTPUT_NAMES}
    if image_size is None:
        dynamic["image"] = {1: "height", 2: "width"}
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # The tracer warns at every torch.tensor() and shape-dependent branch of torchvision's tracing
        # paths, which are written for it; PyTorch adds deprecation notices for this exporter.
        # The tests compare the graph's detections with PyTorch's, at other image sizes too.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        warnings.filterwarnings("ignore", message="To copy construct from a tensor", category=UserWarning)
        # eval() on the wrapper too: the exporter restores the train/eval mode of the module it is given.
        torch.onnx.export(_DetectionGraph(model).eval(), (example,), buffer, dynamo=False, opset_version=opset,
                          input_names=["image"], output_names=list(OUTPUT_NAMES), dynamic_axes=dynamic)
    proto = onnx.load_from_string(buffer.getvalue())
    metadata = {key: json.dumps(info[key]) for key in ("category_names", "label_to_category_id")}
    onnx.helper.set_model_props(proto, metadata)
    return atomic_write(out, lambda handle: handle.write(proto.SerializeToString()))


def run_onnx(path: str | Path | Any, image: Tensor | np.ndarray) -> dict[str, np.ndarray]:
    """Detect objects in one image with an exported model, on onnxruntime's CPU provider.

    Gives what ``model([image])[0]`` gives in PyTorch, as NumPy arrays, in the image's own
    pixel coordinates.

    Args:
        path: the ``.onnx`` file from :func:`export_onnx`, or an ``onnxruntime.InferenceSession``
            made from one (to reuse it across images).
        image: float ``[3, H, W]`` RGB in [0, 1] (``detfocal.data.load_image``), a tensor or an
            array; ``[3, N, N]`` for a graph exported with ``image_size=N``.

    Returns:
        ``{"boxes": float32 [N, 4], "scores": float32 [N], "labels": int64 [N]}``.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: ``path`` is a folder or not an ONNX model with an ``image`` input, or
            ``image`` has the wrong shape or dtype, or is empty (H or W is 0).
        ImportError: onnxruntime is not installed.

    Example:
        >>> detections = run_onnx("model.onnx", load_image("shape.png"))
        >>> detections["boxes"].shape  # (N, 4)
    """
    ort = _require("onnxruntime", "run_onnx")
    if isinstance(path, (str, Path)):
        path = Path(path)
        if path.is_dir():
            raise ValueError(f"ONNX model {path} is a folder, expected an .onnx file")
        if not path.is_file():
            raise FileNotFoundError(f"ONNX model {path} does not exist")
        try:
            session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidProtobuf/... classes
            raise ValueError(f"{path} is not a loadable ONNX model: {' '.join(str(exc).split())[:300]}") from None
    else:
        session = path
    inputs = session.get_inputs()
    if [node.name for node in inputs] != ["image"]:
        raise ValueError(f"the ONNX model takes {[node.name for node in inputs]}, expected one input 'image' "
                         "(a detfocal export)")
    array = image.detach().cpu().numpy() if isinstance(image, Tensor) else np.asarray(image)
    if array.ndim != 3 or array.shape[0] != 3 or not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"image: expected a float [3, H, W] RGB image in [0, 1], got {array.dtype} "
                         f"{list(array.shape)}")
    if array.size == 0:
        raise ValueError(f"image: expected an image with H, W >= 1, got an empty one of shape {list(array.shape)}")
    expected = inputs[0].shape  # [3, "height", "width"], or ints for a fixed-size export
    if any(isinstance(want, int) and want != got for want, got in zip(expected, array.shape)):
        raise ValueError(f"image: this model was exported for images of shape {expected}, got {list(array.shape)}")
    outputs = session.run(list(OUTPUT_NAMES), {"image": np.ascontiguousarray(array, dtype=np.float32)})
    return dict(zip(OUTPUT_NAMES, outputs))
