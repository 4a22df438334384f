"""Run a traced graph with per-site observation and replacement, and re-run only a suffix of it.

Used by the statistics (observe each site's pre-activation before the activation runs, so an
in-place activation never hides it) and by the loss-gap ranking (collapse sites, recompute only what
depends on them from cached activations).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import fx

from tlc.graph import Graph, placeholder_values

Env = dict[fx.Node, Any]


class _Interpreter(fx.Interpreter):
    def __init__(self, runner: GraphRunner, replace: dict[fx.Node, Callable], observe: dict[fx.Node, Callable]):
        super().__init__(runner.graph.gm, garbage_collect_values=False)
        self.runner = runner
        self.replace = replace
        self.observe = observe

    def run_node(self, n: fx.Node) -> Any:
        info = self.runner.graph.info[n]
        if n in self.observe:
            self.observe[n](self.env[info.input])
        if n in self.replace:
            return self.replace[n](self.env[info.input])
        if info.inplace:
            mutated = info.inputs[0] if info.inputs else None
            if isinstance(self.env.get(mutated), torch.Tensor):
                self.env[mutated] = self.env[mutated].clone()  # keep the cached value intact
        return super().run_node(n)


class GraphRunner:
    """Executes ``graph.gm`` node by node (eval mode, no grad) with hooks at chosen nodes."""

    def __init__(self, graph: Graph):
        self.graph = graph
        self.order = {n: i for i, n in enumerate(graph.gm.graph.nodes)}

    def run(self, inputs: Any, *, replace: dict[fx.Node, Callable] | None = None,
            observe: dict[fx.Node, Callable] | None = None, initial_env: Env | None = None) -> tuple[Any, Env]:
        """Output (structured like the model's) and the environment of every node's value."""
        from tlc._inputs import as_call

        args, kwargs = as_call(inputs)
        interpreter = _Interpreter(self, replace or {}, observe or {})
        gm = self.graph.gm
        values = placeholder_values(gm, args, kwargs)
        with torch.no_grad(), _eval_mode(gm, self.graph.backend):
            out = interpreter.run(*values, initial_env=dict(initial_env or {}))  # structured like the model's
        return out, interpreter.env

    def downstream(self, nodes: Iterable[fx.Node]) -> set[fx.Node]:
        """Every node whose value depends on one of ``nodes`` (the nodes included)."""
        seen: set[fx.Node] = set()
        stack = list(nodes)
        while stack:
            n = stack.pop()
            if n in seen:
                continue
            seen.add(n)
            stack.extend(n.users)
        return seen

    def rerun(self, cache: Env, inputs: Any, replace: dict[fx.Node, Callable]) -> Any:
        """The output with ``replace`` applied, recomputing only the nodes that depend on it."""
        dirty = self.downstream(replace)
        initial = {n: v for n, v in cache.items() if n not in dirty and n.op != "output"}
        out, _ = self.run(inputs, replace=replace, initial_env=initial)
        return out


@contextmanager
def _eval_mode(gm: fx.GraphModule, backend: str) -> Iterator[None]:
    """Eval mode for an fx graph; a torch.export graph is already specialised to eval (and refuses .eval())."""
    if backend == "export":
        yield
        return
    modes = {m: m.training for m in gm.modules()}
    gm.eval()
    try:
        yield
    finally:
        for m, mode in modes.items():
            m.training = mode
