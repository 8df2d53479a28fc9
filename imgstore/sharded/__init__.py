"""Sharded datasets: a manifest plus sealed imgstore stores (shards), on a local disk or any fsspec URL.

>>> from imgstore.sharded import ShardedWriter, open_sharded
>>> with ShardedWriter("s3://bucket/cifar", backend="lmdb", shard_size=5000) as writer:
...     writer.add(images, labels)          # a shard is written and sealed every 5 000 images
>>> with open_sharded("s3://bucket/cifar", cache_dir="/scratch/shards", cache_bytes=20 << 30) as data:
...     image, label = data.get(123_456)    # its shard is fetched, checked, cached, opened

Modules: ``manifest`` (the commit point, parsed and checked), ``location`` (local or fsspec),
``writing`` (one shard per call, commits), ``cache`` (bounded LRU cache of remote shards),
``ranges`` (a few records of a remote tar shard by byte ranges), ``dataset`` (the global index).
"""

from imgstore.sharded.cache import ShardCache
from imgstore.sharded.dataset import ShardedDataset, open_sharded
from imgstore.sharded.manifest import DatasetManifest, ShardFile, ShardInfo
from imgstore.sharded.writing import ShardedWriter, commit_shards, read_committed, write_shard

__all__ = [
    "DatasetManifest",
    "ShardCache",
    "ShardFile",
    "ShardInfo",
    "ShardedDataset",
    "ShardedWriter",
    "commit_shards",
    "open_sharded",
    "read_committed",
    "write_shard",
]
