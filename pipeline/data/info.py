"""What a source tells the pipeline besides its rows: classes, selection and where each image came from."""

from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class SourceInfo:
    """Metadata of one selected subset of a source.

    `locations` maps every *selected* image_id to a human-readable origin (file path, "file row 17",
    "test_batch[17]"). Rows are produced lazily by Ray, so an image skipped as unreadable
    (`on_bad_image="skip"`) is only known once the dataset has run; comparing the ids that reached the
    results with `locations` recovers the skipped ones without a side channel, also after a resume.
    """

    num_classes: int
    class_names: tuple[str, ...] | None
    image_shape: tuple[int, int, int] | None  # (C, H, W); None when images keep their stored size
    locations: Mapping[int, str]

    @property
    def num_images(self) -> int:
        """Images selected (rows to expect, less any skipped as unreadable)."""
        return len(self.locations)

    def skipped_paths(self, present_image_ids: Iterable[int]) -> list[str]:
        """Origins of the selected images absent from `present_image_ids`, in image_id order."""
        present = set(int(image_id) for image_id in present_image_ids)
        return [self.locations[image_id] for image_id in sorted(self.locations) if image_id not in present]


ReadFn = Callable[..., Any]


@dataclass(frozen=True)
class Source:
    """A listed source: what it holds (`info`) and how to read any subset of it.

    `read(image_ids=None, num_blocks=None)` returns the ray.data.Dataset of the given selected ids
    (default: every selected image), so a run reads only the images it still has to do and sizes
    its blocks to the actor pool; listing happens once, when the source is opened."""

    info: SourceInfo
    read: ReadFn


def chosen(selected: Collection[int], image_ids: Collection[int] | None) -> list[int]:
    """The ids to read: `image_ids` (which must be selected ones), else every selected id, sorted."""
    if image_ids is None:
        return sorted(int(i) for i in selected)
    wanted = sorted({int(i) for i in image_ids})
    unknown = set(wanted) - {int(i) for i in selected}
    if unknown:
        raise ValueError(f"image ids {sorted(unknown)[:5]} are not in the source's selection")
    return wanted
