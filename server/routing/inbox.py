"""Where a user's inbox lives, and which log events an inbox rebuild already counted (pure).

The inbox (ListDialogs) is a lookup index sharded by user, like a Vitess lookup vindex: user
`u`'s rows live on shard `calculate_shard(u, u, n)` of the `n` inbox shards recorded in the
control database when the inbox was created (independent of the message layout, so moves and
reshards of messages do not move inboxes).
"""

from __future__ import annotations

from dataclasses import dataclass

from server.routing.hash import calculate_shard


def inbox_shard(user_id: int, inbox_shards: int) -> int:
    """The shard holding `user_id`'s inbox rows."""
    return calculate_shard(user_id, user_id, inbox_shards)


@dataclass(frozen=True, slots=True)
class Snapshot:
    """A PostgreSQL snapshot (`pg_current_snapshot()`, text form `xmin:xmax:xip,...`)."""

    xmin: int
    xmax: int
    running: frozenset[int]

    @classmethod
    def parse(cls, text: str) -> Snapshot:
        xmin, xmax, xip = text.split(":")
        return cls(int(xmin), int(xmax), frozenset(int(x) for x in xip.split(",") if x))

    def sees(self, xid: int) -> bool:
        """Whether the snapshot sees the work of (committed) transaction `xid`, as
        `pg_visible_in_snapshot` says."""
        return xid < self.xmin or (xid < self.xmax and xid not in self.running)
