"""Subset selection like the reference certification scripts, done on ids before anything is read."""

import numpy as np

from pipeline.errors import UserError


def select_image_ids(image_ids: np.ndarray, *, start: int, skip: int, num_images: int | None) -> np.ndarray:
    """The ids `start, start + skip, start + 2·skip, …` that exist, in increasing order, at most `num_images`.

    With start = 0 this is "image_id % skip == 0", the reference scripts' `--skip`; the choice depends on
    the id values alone, so the same image gets the same id whatever subset is asked for.
    """
    if skip < 1:
        raise UserError(f"skip must be >= 1, got {skip}")
    if start < 0:
        raise UserError(f"start must be >= 0, got {start}")
    if num_images is not None and num_images < 1:
        raise UserError(f"num_images must be >= 1 or unset, got {num_images}")
    ids = np.sort(np.asarray(image_ids, dtype=np.int64))
    chosen = ids[(ids >= start) & ((ids - start) % skip == 0)]
    if num_images is not None:
        chosen = chosen[:num_images]
    if chosen.size == 0:
        raise UserError(f"no images selected: the source has {ids.size} images, start={start}, skip={skip}")
    return chosen
