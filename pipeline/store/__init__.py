"""The OUT layout, pyarrow/fsspec only: counts and results schemas, content-named counts shards, the run's
settings and image list, and the one atomic writer every file under OUT goes through."""

import pyarrow as pa

# pyarrow's default allocator (jemalloc or mimalloc) aborted the interpreter at shutdown now and then
# ("terminate called without an active exception": 2 of 20 runs of a refused jobs/reduce.py); the
# system allocator never did (0 of 40). Every Parquet read and write of the pipeline goes through store/.
pa.set_memory_pool(pa.system_memory_pool())
