"""A Grid that writes into the round record what every message did: bytes, who was asked to train, who declined or failed."""

from __future__ import annotations

from typing import Iterable

from flwr.app import Message, MessageType
from flwr.serverapp import Grid

from fedlm.protocol import DECLINED
from server.record import RoundRecord


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
    """Delegates to a real Grid and writes every exchange into `record`, the current round's RoundRecord.

    It also bounds every exchange that sets no timeout of its own (Flower's plain fit and evaluate steps wait
    forever) by `timeout` seconds: replies that arrive later are dropped.
    """

    def __init__(self, grid: Grid, timeout: float | None = None) -> None:
        self._grid = grid
        self.timeout = timeout
        self.record = RoundRecord(0)
        """The round loop replaces it at the start of every round."""
        self.stage = "fit"
        """What the current training messages are for (SecAgg+ names its protocol stages)."""

    def _sent(self, messages: list[Message]) -> None:
        self.record.bytes_down += sum(payload_bytes(m) for m in messages)
        self.record.sampled.update(m.metadata.dst_node_id for m in messages
                                   if m.metadata.message_type == MessageType.TRAIN)

    def _received(self, replies: list[Message]) -> None:
        self.record.bytes_up += sum(payload_bytes(m) for m in replies)
        for reply in replies:
            if not reply.has_error():
                continue
            node, reason = reply.metadata.src_node_id, reply.error.reason or ""
            if reply.error.code == DECLINED:
                self.record.declined.append({"node": node, "reason": reason})
            elif reply.metadata.message_type == MessageType.TRAIN:
                self.record.note_failure(node, self.stage, reason.strip().splitlines()[-1][:300] if reason else
                                         f"error code {reply.error.code}")

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
        asked = {m.metadata.dst_node_id for m in messages if m.metadata.message_type == MessageType.TRAIN}
        for node in sorted(asked - {r.metadata.src_node_id for r in replies}):  # Flower drops them silently
            self.record.note_failure(node, self.stage, "no reply within the timeout")
        return replies
