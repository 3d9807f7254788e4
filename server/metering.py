"""A Grid that counts the payload bytes of every message it carries, whatever workflow drives it."""

from __future__ import annotations

from typing import Iterable

from flwr.app import Message, MessageType
from flwr.serverapp import Grid

from fedlm.privacy import DECLINES


def payload_bytes(message: Message) -> int:
    """Bytes of tensors and binary config values in a message (what dominates what goes on the wire)."""
    if not message.has_content():
        return 0
    content = message.content
    size = sum(len(array.data) for record in content.array_records.values() for array in record.values())
    for record in content.config_records.values():
        for value in record.values():
            values = value if isinstance(value, list) else [value]
            size += sum(len(v) for v in values if isinstance(v, bytes))
    return size


class MeteredGrid(Grid):
    """Delegates to a real Grid and adds up bytes sent to (down) and received from (up) clients.

    It also bounds every exchange that sets no timeout of its own (Flower's plain fit and evaluate steps wait
    forever) by `timeout` seconds: replies that arrive later are dropped.
    """

    def __init__(self, grid: Grid, timeout: float | None = None) -> None:
        self._grid = grid
        self.timeout = timeout
        self.bytes_down = 0
        self.bytes_up = 0
        self.train_nodes: set[int] = set()
        """Clients that were sent training instructions."""
        self.declined_nodes: set[int] = set()
        """Clients that declined to train (privacy budget or floor): non-participants, not failures."""

    def _sent(self, messages: list[Message]) -> None:
        self.bytes_down += sum(payload_bytes(m) for m in messages)
        self.train_nodes.update(m.metadata.dst_node_id for m in messages
                                if m.metadata.message_type == MessageType.TRAIN)

    def set_run(self, run) -> None:
        self._grid.set_run(run)

    @property
    def run(self):
        return self._grid.run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        return self._grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self._grid.get_node_ids()

    def get_nodes(self):
        return self._grid.get_nodes()

    def _received(self, replies: list[Message]) -> None:
        self.bytes_up += sum(payload_bytes(m) for m in replies)
        self.declined_nodes.update(m.metadata.src_node_id for m in replies
                                   if m.has_error() and DECLINES in (m.error.reason or ""))

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        messages = list(messages)
        self._sent(messages)
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        replies = list(self._grid.pull_messages(message_ids))
        self._received(replies)
        return replies

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        self._sent(messages)
        replies = list(self._grid.send_and_receive(messages, timeout=self.timeout if timeout is None else timeout))
        self._received(replies)
        return replies
