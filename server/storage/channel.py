"""The NOTIFY channel every change of routing state (shard map, layout) is announced on."""

CHANNEL = "dialog_shard_map"
