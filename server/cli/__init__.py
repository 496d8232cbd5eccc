"""Command-line tools shipped with dialog-shard (`dialogctl`)."""
