"""Encoded image bytes → float32 (C, H, W) in [0, 1]: the certified input space.

The resize and center crop reproduce torchvision's `Resize(resize)`, `CenterCrop(crop)`, `ToTensor()` on
PIL images (the reference scripts' ImageNet preprocessing) with PIL alone, so Ray workers need no
torchvision and the pixels the radii refer to are exactly the reference ones.
"""

import io
import logging
from typing import Literal

import numpy as np
from PIL import Image, UnidentifiedImageError

from pipeline.errors import UserError

logger = logging.getLogger(__name__)

OnBadImage = Literal["skip", "fail"]
ImageMode = Literal["RGB", "L"]
CHANNELS: dict[str, int] = {"RGB": 3, "L": 1}
# What PIL raises on a file that is not an image or is truncated (UnidentifiedImageError is an OSError).
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def check_options(mode: str, resize: int | None, crop: int | None, on_bad_image: str) -> None:
    """UserError for option values the decoder cannot honour, before any Ray work starts."""
    if mode not in CHANNELS:
        raise UserError(f"mode must be one of {sorted(CHANNELS)}, got {mode!r}")
    if on_bad_image not in ("skip", "fail"):
        raise UserError(f"on_bad_image must be 'skip' or 'fail', got {on_bad_image!r}")
    for name, size in (("resize", resize), ("crop", crop)):
        if size is not None and size < 1:
            raise UserError(f"{name} must be >= 1 or unset, got {size}")


def output_shape(mode: str, crop: int | None) -> tuple[int, int, int] | None:
    """(C, H, W) of every decoded image when a crop fixes it; None when images keep their stored size."""
    return None if crop is None else (CHANNELS[mode], crop, crop)


def preprocess(image: Image.Image, *, mode: str, resize: int | None, crop: int | None, location: str) -> np.ndarray:
    """Convert to `mode` (grayscale files become RGB for RGB data), resize the shorter side, center crop, scale."""
    if image.mode != mode:
        image = image.convert(mode)
    if resize is not None:
        width, height = image.size
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = resize, int(resize * long / short)
        new_size = (new_short, new_long) if width <= height else (new_long, new_short)
        if new_size != image.size:
            image = image.resize(new_size, Image.Resampling.BILINEAR)
    if crop is not None:
        width, height = image.size
        if width < crop or height < crop:
            raise UserError(f"image {location} is {width}x{height}, smaller than crop={crop}; set resize >= crop")
        left = int(round((width - crop) / 2.0))
        top = int(round((height - crop) / 2.0))
        image = image.crop((left, top, left + crop, top + crop))
    pixels = np.asarray(image, dtype=np.float32) / np.float32(255.0)
    return pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)


def decode_batch(
    batch: dict[str, np.ndarray],
    *,
    mode: str,
    resize: int | None,
    crop: int | None,
    on_bad_image: OnBadImage,
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
                pixels = preprocess(image, mode=mode, resize=resize, crop=crop, location=str(location))
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
