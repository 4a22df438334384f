"""LaCoOT, "Layer Collapse through Optimal Transport" (Quétu, Liao, Hezbri, Pizzati, Tartaglione; ICCV 2025,
arXiv 2406.08933; docs/methods.md): blocks whose output is nearly their input are replaced by the identity.

Training adds to the loss ``lambda_ot`` times the mean, over the candidate blocks still in the model, of
the max-sliced Wasserstein-2 distance between the batch's block inputs and block outputs (one point per
sample, :func:`tlc.criteria.transport.max_sliced_wasserstein`): it pushes each block towards a map that
moves its input distribution little. Each step measures that distance for every remaining block on
the run's calibration data and replaces the block of lowest distance by ``nn.Identity``
(:class:`tlc.edits.ReplaceByIdentity`). The candidates are found in the traced graph
(:func:`tlc.criteria.blocks.candidate_blocks`): residual blocks and plain same-shape units (``auto``), or
the published code's placement (``paper``).

How the training term sees the blocks: the loss hook runs after the forward, so the blocks' inputs and
outputs are recorded during the forward by forward hooks (:class:`Tap`) that :meth:`LaCoOT.prepare`
puts on the blocks of the model as given. A tap is shared by every copy of the model (``deepcopy``
returns it), and each step's model is a copy made by the step's edit, so the model being fine-tuned is
watched from its first batch, and a resumed run computes what the interrupted one did. A model the
method never saw (``fit`` called with :meth:`LaCoOT.loss` directly, without :meth:`LaCoOT.watch`) is
watched from the loss hook's first call on (the candidates known from :meth:`LaCoOT.prepare`): its
first batch goes without the term. Taps record only in
training mode with gradients on, are inert once pickled, come off the chosen model at the end of a run
(unless a final fine-tuning follows), and :func:`remove_taps` takes them off any model. A block
inlined into a graph module (a training form of :func:`tlc.linearize`) is not a module call a hook can
see: it is still ranked and replaced (on the graph), but the training term leaves it out.
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from tlc.criteria.blocks import PLACEMENTS, Block, candidate_blocks, unreplaceable
from tlc.criteria.runner import GraphRunner
from tlc.criteria.transport import max_sliced_wasserstein
from tlc.edits import Edit, ReplaceByIdentity
from tlc.errors import TLCError
from tlc.graph import Graph, trace
from tlc.methods.base import PAPER_RETRAINING, Method, NoCandidate, Proposal, register_method
from tlc.run.config import RunContext
from tlc.train import FitConfig


@dataclass
class LaCoOTConfig:
    """LaCoOT's own settings (the shared ones: :class:`tlc.run.config.RunConfig`)."""

    lambda_ot: float = 5.0  # weight of the mean block distance in the training loss (0: no term)
    projections: int = 50  # random directions of the max-sliced distance
    p: float = 2.0  # order of the Wasserstein distance
    blocks: str = "auto"  # "auto": residual blocks and plain same-shape units; "paper": the published placement
    max_removed: int | None = None  # blocks replaced by the identity at most (None: no limit)
    train_first: float | None = None  # epochs of training with the distance term before the first removal
    heal: bool = True  # fine-tune (with the term) after each removal; False: judge each removal as it is

    def __post_init__(self) -> None:
        if self.lambda_ot < 0:
            raise ValueError(f"lambda_ot must be >= 0, not {self.lambda_ot}")
        if self.projections < 1:
            raise ValueError(f"projections must be >= 1, not {self.projections}")
        if self.p < 1:
            raise ValueError(f"p must be >= 1, not {self.p}")
        if self.blocks not in PLACEMENTS:
            raise ValueError(f"blocks must be one of {', '.join(PLACEMENTS)}, not {self.blocks!r}")
        if self.max_removed is not None and self.max_removed < 1:
            raise ValueError("max_removed must be >= 1 (or None: no limit)")
        if self.train_first is not None and self.train_first <= 0:
            raise ValueError("train_first must be > 0 epochs (or None: no training before the first removal)")


# The published protocol (github.com/VGCQ/LaCoOT): train with cross-entropy + 5 x the mean max-sliced W2 (50
# directions) by SGD lr 0.1, momentum 0.9, weight decay 1e-4, batch 128, 160 epochs, lr x0.1 at epochs 80 and
# 120; then replace blocks by the identity one at a time, lowest validation distance first, reporting each,
# without healing: the training runs once before the first step and the removals are not fine-tuned.
PAPER = dict(
    blocks="paper", lambda_ot=5.0, projections=50, p=2.0, train_first=PAPER_RETRAINING.epochs, heal=False,
    finetune=PAPER_RETRAINING, retry_single=False, continue_past_budget=True,
)


class Tap:
    """A forward hook that records the input (``role="in"``, on the block) or the measured output (``"out"``,
    on the block or its measured submodule) of ``block`` into ``store``, keyed by the module it fires on,
    while that module trains with gradients on. Shared by every copy of the model it is on; pickled, inert."""

    def __init__(self, store: weakref.WeakKeyDictionary | None, block: str, role: str):
        self.store, self.block, self.role = store, block, role

    def __call__(self, module: nn.Module, args: tuple, output: Any) -> None:
        if self.store is None or not (module.training and torch.is_grad_enabled()):
            return
        value = output if self.role == "out" else (args[0] if args else None)
        if isinstance(value, torch.Tensor):
            self.store.setdefault(module, {})[self.role] = value

    def __deepcopy__(self, memo: dict) -> Tap:
        return self

    def __getstate__(self) -> dict[str, Any]:
        return {"store": None, "block": self.block, "role": self.role}


def taps(model: nn.Module) -> list[tuple[nn.Module, Tap]]:
    """Every (module, tap) on ``model``."""
    return [(m, h) for m in model.modules() for h in m._forward_hooks.values() if isinstance(h, Tap)]


def remove_taps(model: nn.Module, keep: weakref.WeakKeyDictionary | None = None) -> None:
    """Take LaCoOT's taps off ``model`` (all, or all but those recording into ``keep``)."""
    for module in model.modules():
        for key in [k for k, h in module._forward_hooks.items()
                    if isinstance(h, Tap) and (keep is None or h.store is not keep)]:
            del module._forward_hooks[key]
            for table in ("_forward_hooks_with_kwargs", "_forward_hooks_always_called"):
                getattr(module, table, {}).pop(key, None)


def block_distances(graph: Graph, blocks: Sequence[Block], batches: Sequence[tuple[Any, torch.Tensor]],
                    projections: int = 50, p: float = 2.0, seed: int = 0) -> dict[str, float]:
    """Each block's max-sliced distance between its input and its measured output, per batch of
    ``batches`` (eval mode, no grad, directions seeded with ``seed`` + batch index), averaged over the batches."""
    runner = GraphRunner(graph)
    nodes = {n.name: n for n in graph.nodes}
    sums = dict.fromkeys((b.path for b in blocks), 0.0)
    for index, (inputs, _) in enumerate(batches):
        _, env = runner.run(inputs)
        for block in blocks:
            x, y = env[nodes[block.input_node]], env[nodes[block.measured_node]]
            sums[block.path] += float(max_sliced_wasserstein(x, y, projections, p, seed=seed + index))
    return {path: total / max(len(batches), 1) for path, total in sums.items()}


def _replaced(model: nn.Module, path: str) -> bool:
    """Whether the block at ``path`` is gone: the identity, or no longer a submodule (graph modules)."""
    try:
        return isinstance(model.get_submodule(path), nn.Identity)
    except AttributeError:
        return True


def _called(model: nn.Module, path: str) -> bool:
    """Whether a forward hook on submodule ``path`` fires: always in a plain module; in a graph module only
    where a node calls it (a submodule inlined into the graph is never called)."""
    if isinstance(model, fx.GraphModule):
        return any(n.op == "call_module" and n.target == path for n in model.graph.nodes)
    try:
        model.get_submodule(path)
    except AttributeError:
        return False
    return True


@register_method
class LaCoOT(Method):
    """LaCoOT on the method protocol: each step replaces the block of least input-output transport by the identity."""

    name = "lacoot"
    Config = LaCoOTConfig
    presets = {"default": {}, "paper": PAPER}

    def __init__(self, config: LaCoOTConfig | None = None):
        super().__init__(config)
        self.blocks: list[Block] | None = None  # the candidates of the model as given
        self.store: weakref.WeakKeyDictionary[nn.Module, dict[str, torch.Tensor]] = weakref.WeakKeyDictionary()

    # ------------------------------------------------------------------ protocol
    def prepare(self, model: nn.Module, run: RunContext) -> list[Edit]:
        """Find the candidate blocks of the model as given and watch them (no edit)."""
        self.discover(model, trace(model, run.example_inputs), run)
        unseen = self.watch(model)
        if unseen:
            run.log(f"lacoot: {len(unseen)} block(s) inlined in the graph module take no part in the training term: "
                    f"{', '.join(unseen[:5])}")
        return []

    def discover(self, model: nn.Module, graph: Graph, run: RunContext) -> None:
        """The candidates of ``model`` (traced as ``graph``): the blocks of the graph that the identity can
        stand in for when the model runs (those it cannot are logged)."""
        self.blocks = candidate_blocks(graph, self.config.blocks)
        if not isinstance(model, fx.GraphModule):  # a graph module's blocks are checked by their removal
            refused = unreplaceable(model, [b.path for b in self.blocks], run.example_inputs)
            for path, reason in refused.items():
                run.log(f"lacoot: {path} is no candidate: {reason}")
            self.blocks = [b for b in self.blocks if b.path not in refused]

    def watch(self, model: nn.Module, blocks: Sequence[Block] | None = None) -> list[str]:
        """Put this method's taps on the modules of ``blocks`` (default: the candidates) in ``model`` (other
        LaCoOT taps are taken off); the paths of the blocks no hook can see."""
        blocks = self._candidates(model) if blocks is None else blocks
        remove_taps(model, keep=self.store)
        have = {(tap.block, tap.role) for _, tap in taps(model)}
        unseen = []
        for block in blocks:
            if not (_called(model, block.path) and _called(model, block.measured)):
                unseen.append(block.path)
                continue
            for path, role in ((block.path, "in"), (block.measured, "out")):
                if (block.path, role) not in have:
                    model.get_submodule(path).register_forward_hook(Tap(self.store, block.path, role))
        return unseen

    def propose(self, model: nn.Module, graph: Graph, run: RunContext, exclude: Sequence[str]) -> Proposal:
        if self.blocks is None:
            self.discover(model, graph, run)
        self.watch(model)  # the step's model is a copy of this one: it inherits the taps
        initial = [b.path for b in self.blocks]
        removed = [path for path in initial if _replaced(model, path)]
        limit = self.config.max_removed
        if limit is not None and len(removed) >= limit:
            raise NoCandidate(f"{len(removed)} block(s) replaced by the identity (max_removed={limit})")
        current = {b.path: b for b in candidate_blocks(graph, self.config.blocks)}
        remaining = [current[path] for path in initial if path in current and path not in exclude]
        if not remaining:
            aside = sum(path in exclude for path in initial)
            raise NoCandidate("no block left to replace by the identity" + (
                f" ({len(removed)} replaced, {aside} set aside after a rejected step)" if self.blocks else
                " (none found: no submodule reads and hands on a tensor of one shape holding a conv or linear layer)"))
        distances = block_distances(graph, remaining, run.calibration, self.config.projections, self.config.p,
                                    seed=run.config.seed)
        ranked = sorted(remaining, key=lambda b: (distances[b.path], initial.index(b.path)))
        chosen = ranked[0]
        evidence = {
            "block": chosen.path, "distance": distances[chosen.path], "measured": chosen.measured,
            "shape": list(chosen.in_shape[1:]), "placement": self.config.blocks, "removed_before": len(removed),
            "candidates": {b.path: distances[b.path] for b in ranked[1:]},
        }
        label = f"{chosen.path} to the identity (max-sliced W{self.config.p:g} {distances[chosen.path]:.4g})"
        return Proposal([ReplaceByIdentity(chosen.path)], evidence, label=label, finetune=self.config.heal)

    def pretrain(self, run: RunContext) -> FitConfig | None:
        """``train_first`` epochs of the run's fine-tuning recipe, with the distance term, before any removal."""
        if self.config.train_first is None:
            return None
        return dataclasses.replace(run.config.finetune, epochs=self.config.train_first)

    def loss(self, model: nn.Module, inputs: Any, labels: torch.Tensor, outputs: torch.Tensor) -> torch.Tensor | None:
        """``lambda_ot`` x the mean distance between the inputs and outputs of the watched blocks recorded in
        this step's forward; None when nothing was recorded (a model seen for the first time gets its taps
        now, for the next batches)."""
        if self.config.lambda_ot == 0:
            return None
        if self.blocks is None:
            raise TLCError("LaCoOT's training term needs the candidate blocks: call prepare() or propose() first")
        pairs = self._recorded(model)
        if pairs is None:
            self.watch(model)
            return None
        terms = [max_sliced_wasserstein(x, y, self.config.projections, self.config.p) for x, y in pairs]
        return self.config.lambda_ot * torch.stack(terms).mean() if terms else None

    def finalize(self, model: nn.Module, run: RunContext) -> list[Edit]:
        """No edit; the chosen model's taps come off unless a final fine-tuning (with the term) follows."""
        if run.config.final_finetune_epochs <= 0:
            remove_taps(model)
        return []

    # ------------------------------------------------------------------ helpers
    def _candidates(self, model: nn.Module) -> list[Block]:
        """The candidates of the model as given that are still in ``model``."""
        return [b for b in self.blocks or [] if not _replaced(model, b.path)]

    def _recorded(self, model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        """(input, output) of each watched block of ``model`` recorded by its taps since the last call
        (taken out of the store); None when ``model`` has none of this method's taps."""
        modules: dict[str, dict[str, nn.Module]] = {}
        for module, tap in taps(model):
            if tap.store is self.store:
                modules.setdefault(tap.block, {})[tap.role] = module
        if not modules:
            return None
        pairs = []
        for roles in modules.values():
            recorded = {role: self.store.get(m, {}).pop(role, None) for role, m in roles.items()}
            if recorded.get("in") is not None and recorded.get("out") is not None:
                pairs.append((recorded["in"], recorded["out"]))
        return pairs


__all__ = ["PAPER", "LaCoOT", "LaCoOTConfig", "Tap", "block_distances", "remove_taps", "taps"]
