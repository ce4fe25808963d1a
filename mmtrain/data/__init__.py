"""The data pipeline: shards → logical streams → decode → tokenize → pack → Batch."""
