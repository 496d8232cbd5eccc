"""Live delivery (SubscribeMessages): the shards' message logs, read once per process and fanned out
to subscribers (`hub`), woken by LISTEN/NOTIFY (`wakeups`), resumed from tokens (`resume`)."""

from server.delivery.hub import DeliveryHub, Subscription
from server.delivery.resume import ResumeTokens

__all__ = ["DeliveryHub", "ResumeTokens", "Subscription"]
