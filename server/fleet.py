"""Which nodes a round asks, and how long it waits for them: reproducible sampling, a bounded wait
for enough nodes, and over-selection (ask more nodes than needed, keep the first replies).

Flower gives node ids that a simulation draws afresh each run, so sampling from them would make no two
runs, and no resumed run, ask the same clients. Each node is therefore ordered by a key that survives
restarts: its partition id where it has one (simulation, and partition files on devices), else its
node id (which a SuperLink keeps in its database). A round's sample is then a function of
(seed, round, the connected nodes' keys) only.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterable
from logging import INFO
from typing import Any

from flwr.app import Message, MessageType, RecordDict
from flwr.common import log
from flwr.serverapp import Grid

# How often a wait for nodes or replies looks again.
POLL_S = 0.5
# How often the wait for nodes says so in the log.
WAIT_LOG_S = 30.0

# How long a round waits for new nodes to say their partition id: long enough for a Pi to start its
# ClientApp, short enough that a node which died after connecting does not hold the round for the
# whole round-timeout. A node that does not answer is ordered by its node id and asked again.
IDENTITY_TIMEOUT_S = 120.0

NodeKey = tuple[int, int]  # (0, partition id) or (1, node id): partitions first, then by id


def node_key(node_id: int, partition_id: int | None) -> NodeKey:
    return (0, partition_id) if partition_id is not None and partition_id >= 0 else (1, node_id)


def sample_nodes(
    keys: dict[int, NodeKey],
    fraction: float,
    minimum: int,
    over_selection: float,
    seed: int,
    server_round: int,
    purpose: str,
) -> tuple[list[int], int]:
    """(nodes to ask, replies wanted) of one round: ``max(fraction × connected, minimum)`` wanted, and
    ``over_selection`` more asked (rounded up, at most all connected), drawn with a generator seeded by
    (seed, round, purpose) from the nodes in key order."""
    ordered = sorted(keys, key=keys.__getitem__)
    wanted = min(max(int(len(ordered) * fraction), minimum), len(ordered))
    asked = min(math.ceil(wanted * (1.0 + over_selection)), len(ordered))
    return random.Random(f"{seed}/{server_round}/{purpose}").sample(ordered, asked), wanted


def wait_for_nodes(grid: Grid, minimum: int, timeout: float) -> list[int]:
    """The connected nodes once at least ``minimum`` are, or those connected after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    logged, last = -math.inf, -1
    while len(nodes := list(grid.get_node_ids())) < minimum and time.monotonic() < deadline:
        if len(nodes) != last or time.monotonic() - logged > WAIT_LOG_S:
            log(INFO, "waiting for nodes: %d connected, %d needed (for at most %.0f s)", len(nodes), minimum, timeout)
            logged, last = time.monotonic(), len(nodes)
        time.sleep(POLL_S)
    return nodes


def ask_partition_ids(grid: Grid, nodes: Iterable[int], timeout: float) -> dict[int, int]:
    """Each answering node's partition id (-1: none), from one QUERY message per node."""
    messages = [Message(RecordDict(), dst_node_id=node, message_type=MessageType.QUERY) for node in nodes]
    answers = {}
    for reply in grid.send_and_receive(messages, timeout=timeout):
        if not reply.has_error() and "identity" in reply.content:
            value = reply.content.metric_records["identity"].get("partition-id")
            if isinstance(value, int):
                answers[reply.metadata.src_node_id] = value
    return answers


def first_replies(
    grid: Grid, messages: list[Message], wanted: int, usable: Callable[[Message], bool], timeout: float
) -> list[Message]:
    """Send ``messages`` and return the replies received until ``wanted`` of them are ``usable``, every
    message is answered, or ``timeout`` seconds pass. Later replies are abandoned at the SuperLink."""
    pending = set(grid.push_messages(messages))
    deadline = time.monotonic() + timeout
    replies: list[Message] = []
    while pending and sum(map(usable, replies)) < wanted and time.monotonic() < deadline:
        new = list(grid.pull_messages(pending))
        replies += new
        pending -= {m.metadata.reply_to_message_id for m in new}
        if not new:
            time.sleep(POLL_S)
    return replies


class OverSelectingGrid(Grid):
    """A Grid that hands training messages to :func:`first_replies` when a round asked more nodes than
    it wants replies from; everything else goes straight to the wrapped Grid."""

    def __init__(self, grid: Grid, wanted: Callable[[list[Message]], int | None], usable: Callable[[Message], bool]):
        self.grid, self.wanted, self.usable = grid, wanted, usable

    def set_run(self, run: Any) -> None:
        self.grid.set_run(run)

    @property
    def run(self) -> Any:
        return self.grid.run

    def create_message(
        self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str, ttl: float | None = None
    ) -> Message:
        return self.grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        wanted = self.wanted(messages)
        if wanted is None or wanted >= len(messages):
            return self.grid.send_and_receive(messages, timeout=timeout)
        return first_replies(self.grid, messages, wanted, self.usable, math.inf if timeout is None else timeout)
