"""Learnable activations: sites whose non-linearity training moves towards the identity (docs/methods.md,
LayerCollapse and Layer Folding).

Two forms of one module family, :class:`LearnableActivation`, each a site the graph still recognises (a
leaf under torch.fx that keeps the site's name; under torch.export an activation op named after the
module's path), so that tracing, ranking, linearize, merge and ONNX export work with them in the network:

- :class:`PReLUActivation` (LayerCollapse): a PReLU with one slope ``alpha``; the identity at ``alpha = 1``.
- :class:`MixActivation` (Layer Folding): ``a * x + (1 - a) * act(x)`` with one ``a``; the identity at ``a = 1``.

Three edits make the method's changes replayable on a freshly built model: :class:`MakeLearnable` installs
the modules (prepare), :class:`LearnRound` marks one round of training them (a fresh copy of the model, so
that a rejected round leaves the last kept model alone; it records where the round stands), and the sites
whose parameter reached the threshold are snapped to the identity with :class:`tlc.edits.Linearize`. A site
that does not reach it keeps its module and its trained parameter, which is saved with the weights.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import fx, nn

from tlc._inputs import ExampleInputs
from tlc.edits import Edit, register_edit
from tlc.errors import SpecError, TraceError
from tlc.graph import Graph, Site, resolve_sites, trace
from tlc.ops import Kind, OpInfo, register_module
from tlc.sites import SiteActivation
from tlc.surgery.linearize import _wrap, replace_site_nodes

FORMS = ("prelu", "mix")


class LearnableActivation(SiteActivation):
    """A site whose non-linearity has one learnable scalar ``weight`` that makes it the identity at 1.

    It keeps the site's name (``site``) as :class:`tlc.sites.SiteActivation` does. Where a method's loop
    stands is held on every module (set by :class:`LearnRound`, replayed on load): ``round`` (rounds of
    training done), ``idle`` (rounds in a row that started with nothing to snap) and ``regularized``
    (whether the method's loss term still pulls ``weight`` towards 1)."""

    form: ClassVar[str] = ""

    def __init__(self, site: str, activation: str, init: float, *, module: nn.Module | None = None,
                 function: Callable[..., torch.Tensor] | None = None, kwargs: dict[str, Any] | None = None,
                 origin: str | None = None, replaces: str = ""):
        super().__init__(site, activation, module=module, function=function, kwargs=kwargs, origin=origin)
        self.replaces = replaces or activation
        self.weight = nn.Parameter(torch.full((1,), float(init)))
        self.round, self.idle, self.regularized = 0, 0, True

    @property
    def value(self) -> float:
        """The learnable scalar as a float."""
        return float(self.weight.detach().reshape(-1)[0])

    def penalty(self) -> torch.Tensor:
        """The published regularizer of one site (a scalar tensor in the autograd graph)."""
        raise NotImplementedError

    def near_linear(self, threshold: float) -> bool:
        """Whether the parameter has reached the method's threshold (the site may become the identity)."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return (f"site={self.site!r}, replaces={self.replaces}, weight={self.value:.4f}, round={self.round}"
                + ("" if self.regularized else ", not regularized"))


class PReLUActivation(LearnableActivation):
    """LayerCollapse's site: ``x`` where ``x >= 0``, ``alpha * x`` elsewhere (one slope for every channel).
    It replaces the activation it stands for (whatever it was), as the paper's collapsible MLP does."""

    form = "prelu"

    def __init__(self, site: str, init: float = 0.01, *, origin: str | None = None, replaces: str = ""):
        super().__init__(site, "prelu", init, function=F.prelu, origin=origin, replaces=replaces)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.prelu(x, self.weight.to(x.dtype))

    def penalty(self) -> torch.Tensor:
        """LayerCollapse's ``(alpha - 1)^2``."""
        return (self.weight - 1.0).pow(2).sum()

    def near_linear(self, threshold: float) -> bool:
        """``|alpha - 1| < threshold``."""
        return abs(self.value - 1.0) < threshold


class MixActivation(LearnableActivation):
    """Layer Folding's site: ``a * x + (1 - a) * act(x)``, the activation it wraps mixed with the identity
    (computed as ``act(x) + a * (x - act(x))``)."""

    form = "mix"

    def __init__(self, site: str, activation: str, init: float = 0.0, *, module: nn.Module | None = None,
                 function: Callable[..., torch.Tensor] | None = None, kwargs: dict[str, Any] | None = None,
                 origin: str | None = None, clone_input: bool = False):
        super().__init__(site, f"mix:{activation}", init, module=module, function=function, kwargs=kwargs,
                         origin=origin, replaces=activation)
        self.clone_input = clone_input  # the wrapped activation works in place: give it a copy

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.weight.to(x.dtype)
        y = x.clone() if self.clone_input else x
        # .forward, not a module call: under torch.export the op stays in this module, which names the site
        act = self.act.forward(y) if self.act is not None else self.function(y, **self.kwargs)
        # act + a (x - act): under torch.export no product of act with another computed tensor (which would
        # read as the gate of a GLU-style MLP, not a site)
        return act + a * (x - act)

    def penalty(self) -> torch.Tensor:
        """Layer Folding's ``|1 - a^2|``."""
        return (1.0 - self.weight.pow(2)).abs().sum()

    def near_linear(self, threshold: float) -> bool:
        """``a >= threshold``."""
        return self.value >= threshold

    def clamp_(self) -> None:
        """Keep ``a`` in [0, 1] (the paper's constraint)."""
        with torch.no_grad():
            self.weight.clamp_(0.0, 1.0)


def _learnable_info(node: fx.Node, m: LearnableActivation, gm: fx.GraphModule) -> OpInfo:
    return OpInfo(Kind.SITE, (node.args[0],), owner=str(node.target), activation=m.activation)


register_module(PReLUActivation, _learnable_info)
register_module(MixActivation, _learnable_info)


def learnable_modules(model: nn.Module) -> dict[str, LearnableActivation]:
    """The learnable activations of ``model``, by site name, in module order."""
    return {m.site: m for m in model.modules() if isinstance(m, LearnableActivation)}


# ============================================================================ installing them


def make_learnable(model: nn.Module, sites: Iterable[Site | str], example_inputs: ExampleInputs, form: str,
                   init: float) -> nn.Module:
    """A new model where each chosen site is a learnable activation of ``form`` (``prelu`` or ``mix``) with
    its parameter at ``init``; ``model`` is not modified.

    As :func:`tlc.surgery.linearize.linearize` does: for models torch.fx traces, an ``fx.GraphModule`` in
    which every other site is wrapped so that its name stays stable; otherwise the model's own class with
    the activation modules replaced."""
    if form not in FORMS:
        raise SpecError(f"form must be one of {', '.join(FORMS)}, not {form!r}")
    graph = trace(model, example_inputs)
    chosen = resolve_sites(graph, sites)
    result = _install_graph(graph, chosen, form, init) if graph.backend == "fx" else \
        _install_modules(model, chosen, form, init)
    like = next((p for p in model.parameters() if p.is_floating_point()), None)
    if like is not None:  # the new parameters live where the model's do
        for module in learnable_modules(result).values():
            module.weight.data = module.weight.data.to(device=like.device, dtype=like.dtype)
    if getattr(model, "_tlc_record", None):
        result._tlc_record = copy.deepcopy(model._tlc_record)
    return result.train(model.training)


def _learnable(form: str, site: Site, base: SiteActivation, init: float, inplace: bool) -> LearnableActivation:
    """The learnable module of ``form`` for ``site``, whose activation ``base`` computes (``inplace``: in place,
    where a module is then copied out of place and a function given a copy of its input)."""
    if form == "prelu":
        return PReLUActivation(site.name, init, origin=base.origin, replaces=site.activation)
    module = base.act
    if module is not None and getattr(module, "inplace", False):
        module = copy.deepcopy(module)
        module.inplace = False
    kwargs = {k: (False if k == "inplace" else v) for k, v in base.kwargs.items()}
    return MixActivation(site.name, site.activation, init, module=module,
                         function=None if module is not None else base.function, kwargs=kwargs,
                         origin=base.origin, clone_input=module is None and inplace)


def _install_graph(graph: Graph, chosen: list[Site], form: str, init: float) -> fx.GraphModule:
    """The fx form: the chosen site nodes call learnable modules, every other site is wrapped."""
    info = {n.name: graph.info[n] for n in graph.gm.graph.nodes}
    chosen_names = {s.name for s in chosen}

    def module_for(gm: fx.GraphModule, node: fx.Node, site: Site) -> tuple[nn.Module | None, str]:
        existing = gm.get_submodule(node.target) if node.op == "call_module" else None
        if isinstance(existing, LearnableActivation):
            if site.name in chosen_names:
                raise SpecError(f"site {site.name} is already a learnable activation")
            return None, ""
        if site.name not in chosen_names:
            return _wrap(gm, node, site), "tlc_acts"
        base = existing if isinstance(existing, SiteActivation) else _wrap(gm, node, site)
        if base is None:
            raise TraceError(f"site {site.name}: its activation takes computed arguments and cannot be made "
                             "learnable")
        return _learnable(form, site, base, init, info[site.node].inplace), "tlc_learn"

    return replace_site_nodes(graph, module_for)  # the gated sites too, so that every name stays stable


def _install_modules(model: nn.Module, chosen: list[Site], form: str, init: float) -> nn.Module:
    """The torch.export form: each chosen activation module replaced in a copy of the model's own class."""
    for site in chosen:
        if site.module is None or "#" in site.name:
            raise TraceError(
                f"site {site.name} is a functional activation, or a module called several times, in a model "
                "torch.fx cannot trace; tlc can only make activation modules called once learnable there")
    form_model = copy.deepcopy(model)
    for site in chosen:
        existing = form_model.get_submodule(site.module)
        if isinstance(existing, LearnableActivation):
            raise SpecError(f"site {site.name} is already a learnable activation")
        base = SiteActivation(site.name, site.activation, module=existing, origin=site.module)
        form_model.set_submodule(site.module, _learnable(form, site, base, init, inplace=False))
    return form_model


# ============================================================================ edits


@register_edit
@dataclass(frozen=True)
class MakeLearnable(Edit):
    """Prepare-time: the named sites become learnable activations of ``form`` with their parameter at
    ``init`` (the trained values come with the weights). It collapses nothing, so it names no site."""

    kind: ClassVar[str] = "make_learnable"
    site_names: tuple[str, ...]
    form: str = "prelu"
    init: float = 0.0

    def __post_init__(self) -> None:
        if self.form not in FORMS:
            raise SpecError(f"make_learnable: form must be one of {', '.join(FORMS)}, not {self.form!r}")

    @classmethod
    def from_fields(cls, site_names: Sequence[str], form: str = "prelu", init: float = 0.0) -> MakeLearnable:
        """The edit from its fields, checked (they may come from a recipe.json written elsewhere)."""
        if isinstance(site_names, str) or not all(isinstance(n, str) for n in site_names):
            raise SpecError(f"make_learnable: site_names must be a list of site names, not {site_names!r:.120}")
        if type(init) not in (int, float) or not math.isfinite(init):
            raise SpecError(f"make_learnable: init must be a finite number, not {init!r:.120}")
        return cls(tuple(site_names), form, float(init))

    def apply(self, model: nn.Module, example_inputs: ExampleInputs) -> tuple[nn.Module, MakeLearnable]:
        return make_learnable(model, self.site_names, example_inputs, self.form, self.init), self


@register_edit
@dataclass(frozen=True)
class LearnRound(Edit):
    """One round of training the learnable activations: no structural change, a fresh copy of the model
    whose learnable modules record the round's ``number``, ``idle`` (rounds in a row, this one included,
    that started with nothing to snap) and whether the method's loss term still applies (``regularized``:
    False once a fixed schedule of rounds has folded)."""

    kind: ClassVar[str] = "learn_round"
    number: int
    idle: int = 0
    regularized: bool = True

    @classmethod
    def from_fields(cls, number: int, idle: int = 0, regularized: bool = True) -> LearnRound:
        """The edit from its fields, checked (they may come from a recipe.json written elsewhere)."""
        if not (type(number) is int and type(idle) is int and number >= 0 and idle >= 0):
            raise SpecError(f"learn_round: number and idle must be counts >= 0, not {number!r:.40}, {idle!r:.40}")
        if type(regularized) is not bool:
            raise SpecError(f"learn_round: regularized must be true or false, not {regularized!r:.40}")
        return cls(number, idle, regularized)

    def apply(self, model: nn.Module, example_inputs: ExampleInputs) -> tuple[nn.Module, LearnRound]:
        form = copy.deepcopy(model)
        if getattr(model, "_tlc_record", None):  # a GraphModule's copy drops it
            form._tlc_record = copy.deepcopy(model._tlc_record)
        for module in learnable_modules(form).values():
            module.round, module.idle, module.regularized = self.number, self.idle, self.regularized
        return form, self


# ============================================================================ what a round does


@dataclass(frozen=True)
class RoundPlan:
    """What one step of a learnable-activation method does: ``snap`` (sites made the identity now, nearest
    to linear first), then the round ``learn`` marks; ``values`` holds every learnable site's parameter and
    ``fold`` says the step is the one fold that ends a fixed schedule of rounds."""

    snap: tuple[str, ...]
    learn: LearnRound
    values: dict[str, float]
    fold: bool


def plan_round(model: nn.Module, exclude: Sequence[str], threshold: float, rounds: int | None,
               patience: int) -> RoundPlan | str:
    """The next step of the learnable activations of ``model``, or why there is none.

    With ``rounds`` (a fixed schedule), that many rounds of regularized training, then one fold: every site
    that reached ``threshold`` (none of ``exclude``) is snapped and the fine-tuning that follows is not
    regularized. Without, each step snaps the sites that reached it during the previous round and the run
    ends after ``patience`` rounds in a row that started with nothing to snap."""
    modules = learnable_modules(model)
    if not modules:
        return "no learnable activation left"
    state = next(iter(modules.values()))
    if not state.regularized:
        return f"folded after {state.round - 1} round(s) of training"
    values = {site: m.value for site, m in modules.items()}
    ready = sorted((site for site, m in modules.items() if site not in exclude and m.near_linear(threshold)),
                   key=lambda site: abs(values[site] - 1.0))
    number = state.round + 1
    if rounds is not None:
        if state.round >= rounds:
            return RoundPlan(tuple(ready), LearnRound(number, 0, regularized=False), values, fold=True)
        return RoundPlan((), LearnRound(number, 0), values, fold=False)
    if ready:
        return RoundPlan(tuple(ready), LearnRound(number, 0), values, fold=False)
    if state.idle + 1 > patience:
        closest = min(values, key=lambda site: abs(values[site] - 1.0))
        return (f"no learnable activation reached the threshold ({threshold:g}) in {patience} round(s) in a row "
                f"(the closest: {closest} at {values[closest]:.4f})")
    return RoundPlan((), LearnRound(number, state.idle + 1), values, fold=False)


def regularizer(model: nn.Module, strength: float,
                kind: type[LearnableActivation] = LearnableActivation) -> torch.Tensor | None:
    """``strength`` times the sum of the penalties of the model's learnable activations of ``kind`` still
    regularized (None: none is). They are parameters the forward uses, so the term is safe under DDP."""
    terms = [m.penalty() for m in learnable_modules(model).values() if isinstance(m, kind) and m.regularized]
    if not terms:
        return None
    return strength * torch.stack(terms).sum()


__all__ = ["FORMS", "LearnRound", "LearnableActivation", "MakeLearnable", "MixActivation", "PReLUActivation",
           "RoundPlan", "learnable_modules", "make_learnable", "plan_round", "regularizer"]
