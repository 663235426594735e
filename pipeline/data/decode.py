"""Encoded image bytes → float32 (C, H, W): the certified input space ([0, 1], see `Resample`).

The resize and center crop reproduce the published pipelines' torchvision preprocessing without
torchvision, so Ray workers need none and the pixels the radii refer to are exactly the reference ones:
- resample "pil-bilinear": `Resize(resize)`, `CenterCrop(crop)`, `ToTensor()` on PIL images (Cohen et
  al.'s and Carlini et al.'s ImageNet preprocessing; torchvision's default interpolation is bilinear).
- resample "tensor-bicubic": `ToTensor()`, `Resize(resize, interpolation=bicubic)`, `CenterCrop(crop)`
  (the published multi-scale code). Its Resize runs on the float tensor, which with its pinned
  torchvision 0.13 means no antialiasing and no clamping: values can overshoot [0, 1] slightly, as there.
"""

import io
import logging
from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image, UnidentifiedImageError

from pipeline.errors import UserError

logger = logging.getLogger(__name__)

OnBadImage = Literal["skip", "fail"]
ImageMode = Literal["RGB", "L"]
Resample = Literal["pil-bilinear", "tensor-bicubic"]
RESAMPLES: tuple[str, ...] = ("pil-bilinear", "tensor-bicubic")
CHANNELS: dict[str, int] = {"RGB": 3, "L": 1}
# What PIL raises on a file that is not an image or is truncated (UnidentifiedImageError is an OSError).
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


@dataclass(frozen=True)
class Preprocessing:
    """A named published preprocessing of image files: resize the short side, center crop, how to resample."""

    name: str
    resize: int
    crop: int
    resample: Resample
    origin: str

    def describe(self) -> str:
        return f"{self.name} ({self.resample}; {self.origin})"


PREPROCESSING: dict[str, Preprocessing] = {
    p.name: p
    for p in (
        Preprocessing("resize256-crop224", 256, 224, "pil-bilinear", "Cohen et al., Carlini et al."),
        Preprocessing("resize224-crop224", 224, 224, "tensor-bicubic", "the published multi-scale code"),
    )
}


def check_options(mode: str, resize: int | None, crop: int | None, on_bad_image: str,
                  resample: str = "pil-bilinear") -> None:
    """UserError for option values the decoder cannot honour, before any Ray work starts."""
    if mode not in CHANNELS:
        raise UserError(f"mode must be one of {sorted(CHANNELS)}, got {mode!r}")
    if resample not in RESAMPLES:
        raise UserError(f"resample must be one of {', '.join(RESAMPLES)}, got {resample!r}")
    if on_bad_image not in ("skip", "fail"):
        raise UserError(f"on_bad_image must be 'skip' or 'fail', got {on_bad_image!r}")
    for name, size in (("resize", resize), ("crop", crop)):
        if size is not None and size < 1:
            raise UserError(f"{name} must be >= 1 or unset, got {size}")


def output_shape(mode: str, crop: int | None) -> tuple[int, int, int] | None:
    """(C, H, W) of every decoded image when a crop fixes it; None when images keep their stored size."""
    return None if crop is None else (CHANNELS[mode], crop, crop)


def preprocess(image: Image.Image, *, mode: str, resize: int | None, crop: int | None, location: str,
               resample: Resample = "pil-bilinear") -> np.ndarray:
    """Convert to `mode` (grayscale files become RGB for RGB data), resize the shorter side, center crop, scale."""
    if image.mode != mode:
        image = image.convert(mode)
    new_size = None if resize is None else _short_side_size(image.size, resize)
    if resample == "pil-bilinear" and new_size is not None and new_size != image.size:
        image = image.resize(new_size, Image.Resampling.BILINEAR)
    pixels = np.asarray(image, dtype=np.float32) / np.float32(255.0)
    pixels = pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)
    if resample == "tensor-bicubic" and new_size is not None and new_size != image.size:
        pixels = _tensor_bicubic(pixels, new_size)
    return pixels if crop is None else _center_crop(pixels, crop, location)


def _short_side_size(size: tuple[int, int], resize: int) -> tuple[int, int]:
    """(width, height) with the shorter side `resize` and the aspect ratio kept (torchvision's rounding)."""
    width, height = size
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = resize, int(resize * long / short)
    return (new_short, new_long) if width <= height else (new_long, new_short)


def _tensor_bicubic(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """torchvision 0.13's `Resize(interpolation=bicubic)` of a float tensor: no antialias, no clamp."""
    import torch
    import torch.nn.functional as F

    width, height = size
    resized = F.interpolate(torch.from_numpy(pixels)[None], size=(height, width), mode="bicubic",
                            align_corners=False, antialias=False)
    return resized[0].numpy()


def _center_crop(pixels: np.ndarray, crop: int, location: str) -> np.ndarray:
    """torchvision's CenterCrop of a (C, H, W) array (offsets rounded as it rounds them)."""
    height, width = pixels.shape[1:]
    if width < crop or height < crop:
        raise UserError(f"image {location} is {width}x{height}, smaller than crop={crop}; set resize >= crop")
    left = int(round((width - crop) / 2.0))
    top = int(round((height - crop) / 2.0))
    return np.ascontiguousarray(pixels[:, top:top + crop, left:left + crop])


def decode_batch(
    batch: dict[str, np.ndarray],
    *,
    mode: str,
    resize: int | None,
    crop: int | None,
    on_bad_image: OnBadImage,
    resample: Resample = "pil-bilinear",
) -> dict[str, np.ndarray]:
    """Ray `map_batches` step: columns bytes, image_id, label, location → image_id, label, image.

    Unreadable images are dropped with a warning (`skip`) or stop the run with a UserError naming the file
    (`fail`); dropped ones are recoverable afterwards from `SourceInfo.skipped_paths`.
    """
    kept_rows: list[int] = []
    images: list[np.ndarray] = []
    for row, (data, location) in enumerate(zip(batch["bytes"], batch["location"], strict=True)):
        try:
            if data is None:
                raise ValueError("no image bytes")
            with Image.open(io.BytesIO(data)) as image:
                image.load()
                pixels = preprocess(image, mode=mode, resize=resize, crop=crop, location=str(location),
                                    resample=resample)
        except _DECODE_ERRORS as err:
            reason = "not an image format PIL can read" if isinstance(err, UnidentifiedImageError) else str(err)
            if on_bad_image == "fail":
                raise UserError(f"cannot decode image {location}: {reason}") from None
            logger.warning("skipping unreadable image %s: %s", location, reason)
            continue
        kept_rows.append(row)
        images.append(pixels)
    shapes = sorted({pixels.shape for pixels in images})
    if len(shapes) > 1:
        raise UserError(f"images differ in size ({shapes[0]} vs {shapes[-1]}); set crop (and resize)")
    empty_shape = (0, *(shapes[0] if shapes else output_shape(mode, crop) or (CHANNELS[mode], 0, 0)))
    return {
        "image_id": np.asarray(batch["image_id"], dtype=np.int64)[kept_rows],
        "label": np.asarray(batch["label"], dtype=np.int64)[kept_rows],
        "image": np.stack(images) if images else np.zeros(empty_shape, dtype=np.float32),
    }
