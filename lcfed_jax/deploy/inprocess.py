"""A Grid whose nodes are ClientApps in this process: the Flower apps without a SuperLink.

Every message is handled as a SuperNode handles it: it crosses Flower's wire format
(protobuf) both ways, the ClientApp gets the node's `Context` (its node config, the run
config, its persistent `state`), and an exception in the ClientApp becomes an error reply.
Messages are delivered one at a time, in order, in this thread, so a run is deterministic
and a test can look at every message the server received (`received`), stop a node
(`down`), fail a delivery from a hook (`hooks`), act after a reply (`after`), or replace a
node by a fresh one (`restart`).

  grid = InProcessGrid(client_app, [{"site": "clinic_a"}, {"site": "clinic_b"}], run_config)
  run(server_app, grid, run_config)
"""
from __future__ import annotations

import uuid
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence

from flwr.app import Context, Error, Message, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity


def _wire(msg: Message) -> Message:
  return message_from_proto(message_to_proto(msg))


class InProcessGrid(Grid):
  def __init__(self, client_app, node_configs: Sequence[Mapping], run_config: Optional[Mapping] = None,
               run_id: int = 1):
    self.client_app, self.run_config, self.run_id = client_app, dict(run_config or {}), int(run_id)
    self.contexts: Dict[int, Context] = {}
    self.received: List[Message] = []                       # every reply, as the server got it
    self.down: set = set()                                  # nodes that never answer
    self.hooks: List[Callable[[Message, int], None]] = []   # called before a delivery; may raise
    self.after: List[Callable[[Message, int], None]] = []   # called with every reply
    self._queue: Dict[str, Message] = {}
    self._next_node = 1001
    self._run = None
    for node_config in node_configs:
      self.add_node(node_config)

  def add_node(self, node_config: Mapping) -> int:
    node = self._next_node
    self._next_node += 1
    self.contexts[node] = Context(run_id=self.run_id, node_id=node, node_config=dict(node_config),
                                  state=RecordDict(), run_config=dict(self.run_config))
    return node

  def restart(self, node: int) -> int:
    """The node replaced by a new one with the same node config (a restarted SuperNode)."""
    config = self.contexts.pop(node).node_config
    return self.add_node(config)

  # --------------------------------------------------------------- the Grid API
  def set_run(self, run) -> None:
    self._run = run

  @property
  def run(self):
    return self._run

  def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                     ttl: Optional[float] = None) -> Message:
    return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

  def get_node_ids(self) -> Iterable[int]:
    return list(self.contexts)

  def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
    ids = []
    for msg in messages:
      meta = msg.metadata.__dict__
      meta.update(_message_id=uuid.uuid4().hex, _run_id=self.run_id, _src_node_id=SUPERLINK_NODE_ID)
      self._queue[meta["_message_id"]] = msg
      ids.append(meta["_message_id"])
    return ids

  def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
    replies = []
    for mid in message_ids:
      reply = self._deliver(self._queue.pop(mid))
      if reply is not None:
        replies.append(reply)
    return replies

  def send_and_receive(self, messages: Iterable[Message], *, timeout: Optional[float] = None
                       ) -> Iterable[Message]:
    return self.pull_messages(self.push_messages(messages))

  # --------------------------------------------------------------- delivery
  def _deliver(self, msg: Message) -> Optional[Message]:
    msg = _wire(msg)
    node = msg.metadata.dst_node_id
    if node in self.down or node not in self.contexts:
      return None
    try:
      for hook in self.hooks:
        hook(msg, node)
      reply = self.client_app(msg, self.contexts[node])
    except Exception as e:   # noqa: BLE001 - what a SuperNode reports back
      reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=f"{type(e).__name__}: {e}"),
                      reply_to=msg)
    reply.metadata.__dict__["_message_id"] = uuid.uuid4().hex
    reply = _wire(reply)
    self.received.append(reply)
    for hook in self.after:
      hook(reply, node)
    return reply


def run(server_app, grid: InProcessGrid, run_config: Optional[Mapping] = None) -> Context:
  """Runs `server_app` on `grid` (what a SuperLink does with `flwr run`)."""
  # The identity Flower's runtimes give the ServerApp's process (messages read it).
  TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, grid.run_id, SUPERLINK_NODE_ID
  context = Context(run_id=grid.run_id, node_id=0, node_config={}, state=RecordDict(),
                    run_config=dict(run_config if run_config is not None else grid.run_config))
  server_app(grid, context)
  return context
