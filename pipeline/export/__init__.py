"""The dataset export: per-sample records (licence, attribution, labels, split), the image shards built from them,
and the datasheet. Writing and reading the shard files themselves is ``pipeline.core.shards``."""
