"""Which node is which site: greetings ('query.hello'), the checks that refuse a site, sending.

A node becomes a site when its hello reply names a site of the task, with a config equal
to the server's in every setting a site may not set alone (`settings.differences`) and
the leaves that travel in the shapes of the server's model (`records.check_shapes`).
Anything else refuses it with a `UserError` naming the site and the setting or parameter
path, which stops the run: a site that trains another experiment cannot take part. A
node that appears later (a restarted client) is greeted before the next round; when it
is a site already known, it takes that site's place.
"""
from __future__ import annotations

import time
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Tuple

from flwr.app import ConfigRecord, Message, RecordDict

from lcfed_jax.deploy import records
from lcfed_jax.deploy.settings import differences
from lcfed_jax.util.errors import UserError

HELLO_TIMEOUT = 120.0   # s: a hello builds the site (data, model) but compiles nothing


class Roster:
  def __init__(self, grid, names: List[str], config_json: str, shapes: Mapping, log: Callable[[str], None],
               timeout: float):
    self.grid, self.names, self.config_json, self.shapes = grid, list(names), config_json, dict(shapes)
    self.log, self.timeout = log, float(timeout)
    self.node_of: Dict[int, int] = {}          # site -> node id
    self.greeted: set = set()                  # nodes that answered a hello
    self.silent: set = set()                   # nodes that did not
    self.train_sizes: List[Optional[int]] = [None] * len(names)

  def name(self, k: int) -> str:
    return self.names[k]

  def connect(self, node_timeout: float) -> None:
    """Waits until every site has a node, greeting nodes as they come."""
    deadline = time.time() + float(node_timeout)
    while True:
      self.refresh(retry_silent=True)
      missing = [n for k, n in enumerate(self.names) if k not in self.node_of]
      if not missing:
        return
      if time.time() > deadline:
        raise UserError(f"{len(self.node_of)} of {len(self.names)} sites connected within "
                        f"{node_timeout:.0f}s (run config node-timeout); missing: {missing}")
      time.sleep(0.5)

  def refresh(self, retry_silent: bool = False) -> None:
    """Greets the nodes not greeted yet (a node that did not answer once is asked again
    only while connecting: a dead node may stay listed for a while)."""
    skip = self.greeted if retry_silent else self.greeted | self.silent
    new = [int(n) for n in self.grid.get_node_ids() if int(n) not in skip]
    if new:
      self._greet(new)

  def _greet(self, nodes: List[int]) -> None:
    instr = ConfigRecord({"config": self.config_json})
    msgs = [Message(RecordDict({"instr": instr}), n, "query.hello", group_id="hello") for n in nodes]
    timeout = min(self.timeout, HELLO_TIMEOUT)
    replies = list(self.grid.send_and_receive(msgs, timeout=timeout))
    answered = {int(r.metadata.src_node_id) for r in replies}
    for n in nodes:
      if n not in answered:
        self.silent.add(n)
        self.log(f"node {n} did not answer the hello within {timeout:.0f}s")
    claimed: Dict[int, int] = {}
    for r in replies:
      node = int(r.metadata.src_node_id)
      if r.has_error():
        raise UserError(f"node {node}: its ClientApp failed to start: {r.error.reason}")
      k = self._check(node, r.content["hello"], records.shapes_from_record(r.content["shapes"]))
      if k in claimed:
        raise UserError(f"nodes {claimed[k]} and {node} are both site {self.names[k]} (node config 'site')")
      claimed[k] = node
    for k, node in claimed.items():
      old = self.node_of.get(k)
      self.node_of[k] = node
      self.greeted.add(node)
      self.log(f"site {self.names[k]}: node {node}" + (f" (was node {old}: reconnected)" if old is not None else ""))

  def _check(self, node: int, hello: ConfigRecord, shapes: Mapping) -> int:
    site = str(hello.get("site", "")) or f"at node {node}"
    config = str(hello.get("config", ""))
    diffs = differences(self.config_json, config) if config else []
    if diffs:
      raise UserError(f"site {site} refused: its config differs from the server's: {'; '.join(diffs)}")
    if hello.get("error"):
      raise UserError(f"site {site} refused: {hello['error']}")
    records.check_shapes(self.shapes, shapes, f"site {site} refused")
    k = int(hello["site-index"])
    self.train_sizes[k] = int(hello["train-size"])
    return k

  def send(self, kind: str, contents: Mapping[int, RecordDict], label: str
           ) -> Tuple[Dict[int, Message], Dict[int, str]]:
    """Sends every site its content: ({site: reply}, {site: why it has none})."""
    msgs = [Message(content, self.node_of[k], kind, group_id=label) for k, content in contents.items()]
    site_of = {node: k for k, node in self.node_of.items()}
    ok, failed = {}, {}
    for r in self.grid.send_and_receive(msgs, timeout=self.timeout):
      k = site_of.get(int(r.metadata.src_node_id))
      if k is None or k not in contents:
        continue
      if r.has_error():
        failed[k] = f"its ClientApp failed: {r.error.reason}"
      else:
        ok[k] = r
    for k in contents:
      if k not in ok and k not in failed:
        failed[k] = f"no reply within {self.timeout:.0f}s (run config round-timeout)"
    return ok, failed

  def describe(self, failed: Mapping[int, str]) -> str:
    return "; ".join(f"site {self.names[k]}: {why}" for k, why in sorted(failed.items()))

  def sites(self) -> Iterable[int]:
    return range(len(self.names))
