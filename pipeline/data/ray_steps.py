"""The Ray Data steps every image source ends with, in one place."""

import ray.data

from pipeline.data.decode import OnBadImage, Resample, decode_batch

# Decoded ImageNet rows are ~0.6 MB each (3×224×224 float32); small batches keep blocks near 40 MB.
DECODE_BATCH_SIZE = 64


def decode_step(
    dataset: ray.data.Dataset, *, mode: str, resize: int | None, crop: int | None, on_bad_image: OnBadImage,
    resample: Resample = "pil-bilinear",
) -> ray.data.Dataset:
    """Append the decode/preprocess step to rows with columns bytes, image_id, label, location."""
    decoded = dataset.map_batches(
        decode_batch,
        batch_format="numpy",
        batch_size=DECODE_BATCH_SIZE,
        fn_kwargs={"mode": mode, "resize": resize, "crop": crop, "on_bad_image": on_bad_image, "resample": resample},
    )
    return surface_user_errors(decoded)


def surface_user_errors(dataset: ray.data.Dataset) -> ray.data.Dataset:
    """Make a UserError raised inside a Ray task reach the driver as a UserError instance.

    By default Ray Data wraps it in a UserCodeException that keeps only the text; with this flag the
    driver gets `RayTaskError(UserError)`, which `except UserError` catches (its `.cause` holds the
    original). The flag lives in this dataset's own DataContext, so datasets derived from it inherit it
    and no global setting changes.
    """
    dataset.context.raise_original_map_exception = True
    return dataset
