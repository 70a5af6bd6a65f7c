"""The broker's Python client.

- `Publisher` (publisher.py): an engine pushes events over ZeroMQ PUSH.
- `subscribe()` / `Subscription` (subscription.py): a program watches
  one workflow or several over SSE or WebSocket, sync or under trio,
  resumed after every drop, stopping at the end.
- `Message`, `WorkflowView` (view.py): the typed messages, and the
  state of each watched workflow kept from them.
"""

from .publisher import Publisher
from .subscription import Subscription, subscribe
from .view import Message, StreamState, SubscriptionError, WorkflowView

__all__ = ["Message", "Publisher", "StreamState", "Subscription", "SubscriptionError", "WorkflowView", "subscribe"]
