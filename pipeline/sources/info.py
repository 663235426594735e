"""What a source tells the pipeline besides its rows: classes, selection and where each image came from."""

from collections.abc import Iterable, Mapping
from dataclasses import dataclass


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
