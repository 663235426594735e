"""Data sources as Ray Data readers (this package imports ray.data; nothing else of Ray), and the embedded
digits set (numpy only, digits.py).

Every source is opened once (listing, selection) and returns a `Source(info, read)`;
`read(image_ids, num_blocks)` gives the Ray Dataset of any subset of the selection, so a run reads only
the images it still has to do, in blocks sized to its actor pool. Rows are
`{"image_id": int64, "label": int64, "image": float32 (C, H, W) in [0, 1]}`, already in the certified input
space (the space sigma and the radii refer to). image_id is the image's index in the full source in its
deterministic order (or an explicit id column), fixed before any subsetting, so it is stable across runs
and subsets; rows arrive in no particular order. Subsets (`start`, `skip`, `num_images`) are chosen on ids
before reading, so only selected images are read. Paths may be local or fsspec URLs (file://, s3://, gs://;
`storage_options` go to the fsspec filesystem). A UserError raised while Ray runs the dataset (an unreadable
image with on_bad_image="fail") reaches the driver as `RayTaskError(UserError)`, an instance of UserError
whose `.cause` is the original; the first line of `str(err.cause)` is the one-line message.

The sources live in their modules (cifar10, class_folder, parquet); this file imports none of them, so
that the jobs' flag checks and --help do not pay for importing ray.data.
"""
