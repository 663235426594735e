"""The OUT layout, pyarrow/fsspec only: counts and results schemas, content-named counts shards, the run's
settings and image list, and the one atomic writer every file under OUT goes through."""
