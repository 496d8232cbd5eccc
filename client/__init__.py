"""Python client of dialog-shard: generated stubs in `client.gen`, typed wrapper here."""
