"""Moving messages between shards online: one unit's move, resuming crashed moves, resharding, verifying.

- `mover`: `Mover`, one unit's copy -> fence -> catch up -> verify -> flip -> clean.
- `resumer`: completes moves whose mover died, from any server.
- `reshard`: N -> N' shards as a plan of unit moves.
- `verify`: checks (and repairs) that every message is stored once, on its routed shard.
"""
