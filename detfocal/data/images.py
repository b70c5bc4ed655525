"""Decode image files into tensors, turning every way a file can be broken into one clear reason."""
from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as F

__all__ = ["ImageNotFoundError", "ImageLoadError", "UndecodableImageError", "decode_image_file", "load_image",
           "to_uint8"]

# PIL modes whose pixels are 16-bit (or wider) integers; "I" is what older Pillow gives 16-bit PNGs.
_WIDE_INTEGER_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


class UndecodableImageError(ValueError):
    """A file exists but is not an image PIL can decode; ``reason`` says why, on one line."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _OneLineFromWorkers:
    """Keeps an exception's one-line message when a DataLoader worker raised it.

    The DataLoader re-raises a worker's exception as ``type(exc)(text)``, where ``text`` is
    "Caught ... in DataLoader worker process N" followed by the worker's whole traceback; the
    user would see that instead of the reason. The traceback's last line is
    ``module.Name: <the original message>``, so that message is what is kept.
    """

    def __init__(self, message: str) -> None:
        if message.startswith("Caught ") and "\nOriginal Traceback" in message:
            marker = f"{type(self).__name__}: "
            for line in reversed(message.splitlines()):
                if marker in line:
                    message = line.split(marker, 1)[1]
                    break
        super().__init__(message)


class ImageLoadError(_OneLineFromWorkers, ValueError):
    """A dataset image cannot be decoded or is not the size its annotations say.

    A ``ValueError`` whose message is one line, also when a DataLoader worker raised it.
    """


class ImageNotFoundError(_OneLineFromWorkers, FileNotFoundError):
    """A dataset image file is missing.

    A ``FileNotFoundError`` whose message is one line, also when a DataLoader worker raised it.
    """


def _claimed_size(path: str | os.PathLike) -> tuple[int, int] | None:
    """The (width, height) a file's header claims, read without PIL's pixel limit and without
    decoding pixels; None when no registered format reads the header."""
    with open(path, "rb") as handle:
        prefix = handle.read(16)
        for format_id in Image.ID:
            factory, accept = Image.OPEN[format_id]
            if accept is not None and not accept(prefix):
                continue
            handle.seek(0)
            try:
                return factory(handle, os.fspath(path)).size
            except Exception:  # noqa: BLE001 - any failure means "not this format"
                continue
    return None


def _bomb_reason(path: str | os.PathLike, exc: Exception) -> str:
    size = _claimed_size(path)
    if size is not None:
        claim = f"{size[0]} x {size[1]} pixels"
    else:
        found = re.search(r"\((\d+) pixels\)", str(exc))
        claim = f"{found.group(1)} pixels" if found else "more pixels"
    return f"image claims {claim}, above PIL's limit of {Image.MAX_IMAGE_PIXELS}"


def decode_image_file(path: str | os.PathLike) -> torch.Tensor:
    """Decode an image file fully into an RGB tensor, or raise one reason for why it cannot be.

    Pixels are decoded here, not lazily, so a truncated file fails now rather than later
    (unless a program sets ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES``, which this leaves alone).
    PIL's DecompressionBombWarning is an error here too: a file claiming more than
    ``PIL.Image.MAX_IMAGE_PIXELS`` pixels is rejected before its pixels are allocated.
    Alpha is dropped (not composited), as torchvision's ``ImageReadMode.RGB`` does; EXIF
    orientation is ignored, as COCO's boxes assume.

    Args:
        path: the image file.

    Returns:
        ``uint8 [3, H, W]`` for 8-bit files (RGB, RGBA, greyscale, palette, CMYK, ...), or
        ``float32 [3, H, W]`` in [0, 1] for 16-bit greyscale files (PIL modes ``I;16*`` and
        ``I``), scaled by 1/65535. PIL reads 16-bit RGB PNGs as 8-bit (their high bytes).

    Raises:
        FileNotFoundError: ``path`` is not a file.
        UndecodableImageError: a ``ValueError`` whose ``reason`` says why the file cannot be
            decoded (empty, not an image, truncated, too many pixels, unsupported pixel type).
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image {path} does not exist or is not a file")
    if os.path.getsize(path) == 0:
        raise UndecodableImageError("the file is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                if image.mode in _WIDE_INTEGER_MODES:
                    # convert("RGB") would clip these to 255; scale the full range instead.
                    pixels = np.asarray(image, dtype=np.float32) / 65535.0
                    grey = torch.from_numpy(pixels.clip(0.0, 1.0))
                    return grey.unsqueeze(0).expand(3, -1, -1).contiguous()  # (H, W) -> (3, H, W)
                if image.mode == "F":
                    raise UndecodableImageError("its pixels are 32-bit floats (PIL mode F), which have no fixed "
                                                "range; expected 8- or 16-bit pixels")
                # A palette with a transparent colour must go through RGBA, or PIL warns on convert.
                if image.mode == "P" and "transparency" in image.info:
                    image = image.convert("RGBA")
                return F.pil_to_tensor(image.convert("RGB"))  # convert() loads: truncation fails here
    except UndecodableImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise UndecodableImageError(_bomb_reason(path, exc)) from None
    except Image.UnidentifiedImageError:
        raise UndecodableImageError("it is not in an image format PIL can read") from None
    except Exception as exc:  # noqa: BLE001 - whatever PIL raises on a broken file is a property of the file
        detail = " ".join(str(exc).split()) or "no detail"
        raise UndecodableImageError(f"{type(exc).__name__}: {detail}") from None


def load_image(path: str | os.PathLike) -> torch.Tensor:
    """Load an image file for inference: float32 ``[3, H, W]`` in [0, 1].

    8-bit files (RGB, RGBA, greyscale, palette) give the same values as torchvision's
    ``to_dtype(to_image(pil_image.convert("RGB")), torch.float32, scale=True)``; 16-bit
    greyscale PNGs are scaled by 1/65535 (see ``decode_image_file``).

    Args:
        path: the image file.

    Returns:
        float32 tensor ``[3, H, W]`` in [0, 1].

    Raises:
        FileNotFoundError: ``path`` is not a file.
        ValueError: the file cannot be decoded; one line, ``image <path> cannot be decoded: <reason>``.

    Example:
        >>> image = load_image("dog.jpg")
        >>> predictions = model([image])
    """
    try:
        image = decode_image_file(path)
    except UndecodableImageError as exc:
        raise ValueError(f"image {Path(path)} cannot be decoded: {exc.reason}") from None
    return F.to_dtype(image, torch.float32, scale=True) if image.dtype == torch.uint8 else image


def to_uint8(image: torch.Tensor) -> torch.Tensor:
    """Turn a float image in [0, 1] into the uint8 image torchvision's drawing utilities take.

    Values outside [0, 1] are clamped, so a slightly overshooting augmentation still draws.

    Args:
        image: float tensor ``[3, H, W]`` (or ``[1, H, W]``), nominally in [0, 1].

    Returns:
        uint8 tensor of the same shape, ``round(255 * value)``.

    Raises:
        ValueError: ``image`` is not a floating-point ``[C, H, W]`` tensor with 1 or 3 channels.
    """
    if not isinstance(image, torch.Tensor) or not torch.is_floating_point(image) or image.ndim != 3 \
            or image.shape[0] not in (1, 3):
        description = f"{image.dtype} {tuple(image.shape)}" if isinstance(image, torch.Tensor) else type(image).__name__
        raise ValueError(f"image: expected a float tensor [3, H, W] or [1, H, W] in [0, 1], got {description}")
    return (image.detach().clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)
