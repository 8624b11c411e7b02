"""Lossless WebDataset shard I/O.

Writer: `ShardWriter` / `write_shards` write `key.json` (LLaVA record) plus `key.<ext>` (one image) or
`key.<i>.<ext>` (several), image bytes untouched, with fixed tar metadata so equal inputs give
byte-identical shards. Reader: `iter_shard` / `iter_samples` stream a shard from a local path or any
fsspec URL (s3://...) and turn every bad record into a ledger quarantine row with a reason; nothing
crashes the job and nothing vanishes.

Speed (benchmarks/export_throughput.py): headers are written from a tarfile-built template (only name,
size and checksum change) and the writer hands ~1 MB batches to one thread that hashes and writes them
while the caller reads on. A local shard that is exactly what ShardWriter writes (every header equal to
the writer's bytes, clean end) is indexed without tarfile and its images are read with `os.pread` only
for the samples that are wanted; any other local tar is parsed by tarfile with seeks, and fsspec URLs
are read in tarfile's stream mode in one forward pass. All paths yield the same samples.

Modules: `members` (tar member names and header bytes), `writer` (ShardWriter, write_shards, ShardInfo),
`tars` (local/streamed tar access), `reader` (list_shards, export_manifest/export_shards, iter_shard, iter_samples). The public names are
re-exported here, so `from core.io.wds import ...` keeps working.
"""

from core.io.wds.members import image_member_names, sample_members, shard_name
from core.io.wds.reader import MAX_JSON_BYTES, export_manifest, export_shards, iter_samples, iter_shard, list_shards
from core.io.wds.writer import ShardInfo, ShardWriter, write_shards

__all__ = [
    "MAX_JSON_BYTES",
    "ShardInfo",
    "export_manifest",
    "export_shards",
    "ShardWriter",
    "image_member_names",
    "iter_samples",
    "iter_shard",
    "list_shards",
    "sample_members",
    "shard_name",
    "write_shards",
]
