"""An in-process federation for tests: real Flower Messages, the real ClientApp handlers, no SuperLink.

``LoopbackGrid`` plays Flower's Grid for a strategy: it hands each Message to the ClientApp's train,
evaluate or query handler with that node's own persistent ``Context`` and turns a raised exception into
an error reply, as a SuperNode would. A ``tamper`` hook can rewrite training and evaluation replies to
test how the server rejects them; the replies of ``slow`` nodes never arrive.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from flwr.app import Context, Error, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from client.client_app import evaluate_handler, identity, train

RUN_ID = 7
HANDLERS = {MessageType.TRAIN: train, MessageType.EVALUATE: evaluate_handler, MessageType.QUERY: identity}


def set_task_identity() -> None:
    """Messages built outside a run need a run id; the ServerApp's task gets one from Flower."""
    TaskIdentity.run_id = RUN_ID
    TaskIdentity.task_id = 1
    TaskIdentity.node_id = 0


class LoopbackGrid:
    def __init__(
        self,
        num_nodes: int,
        run_config: dict,
        tamper: Callable[[int, Message], Message] | None = None,
        first_node: int = 101,
    ):
        set_task_identity()
        self.contexts = {
            node_id: Context(
                run_id=RUN_ID,
                node_id=node_id,
                node_config={"partition-id": i, "num-partitions": num_nodes},
                state=RecordDict(),
                run_config=dict(run_config),
            )
            for i, node_id in enumerate(range(first_node, first_node + num_nodes))
        }
        self.tamper = tamper
        self.sent: list[Message] = []
        self.slow: set[int] = set()
        self.waiting: dict[str, Message] = {}  # pushed messages' replies, by the id of what they answer

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        ids = []
        for i, msg in enumerate(messages):
            # Flower's grid gives each message its id as it pushes it, in place; replies refer to it
            msg.metadata.__dict__["_message_id"] = msg.object_id
            self.sent.append(msg)
            try:
                reply = HANDLERS[msg.metadata.message_type](msg, self.contexts[msg.metadata.dst_node_id])
            except Exception as exc:  # a SuperNode reports a crashed ClientApp as an error reply
                reply = Message(error=Error(code=0, reason=f"{type(exc).__name__}: {exc}"), reply_to=msg)
            if self.tamper is not None and msg.metadata.message_type != MessageType.QUERY:
                reply = self.tamper(i, reply)
            if msg.metadata.dst_node_id not in self.slow:
                self.waiting[msg.metadata.message_id] = reply
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        return [self.waiting.pop(i) for i in message_ids if i in self.waiting]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        return self.pull_messages(self.push_messages(messages))
