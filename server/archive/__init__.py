"""Cold storage of old messages: Parquet files (zstd) in a local directory or S3-compatible storage.

`store` reaches the files, `files` says what a file holds and where it lives, `manifest` lists
the files readers may use, `reader` serves a dialog's archived page and `merge` joins it with the
shard's hot page. Archiving itself (moving rows from the shards into files) is server.moves.archiver.
"""
