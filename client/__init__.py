"""Python client of dialog-shard: generated stubs in `client.gen`, typed wrapper here."""

from client._channel import ChannelSecurity, TokenProvider, aio_channel, sync_channel

__all__ = ["ChannelSecurity", "TokenProvider", "aio_channel", "sync_channel"]
