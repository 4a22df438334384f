"""The latency merge policy: plans priced by a latency table, recorded with the deploy form and replayed on
load without measuring, TLC's savings in time, the warning when merge and linearize plan for different
policies, and a measured net where the latency policy merges what "macs" refuses and runs faster."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from torch import nn

import tlc
from tlc.errors import SpecError, TLCError
from tlc.graph import trace
from tlc.measure import LatencyTable, depth
from tlc.methods.tlc import collapse_savings
from tlc.surgery import pricing
from tlc.surgery.pricing import using_table

from .helpers import randomize_bn, rel_err


class CallBound:
    """A table where every layer costs a fixed call overhead plus a little per MAC: merging pays."""

    def __init__(self):
        self.read: list[str] = []

    def seconds(self, shape) -> float:
        self.read.append(shape.key())
        return 1e-4 + 1e-12 * shape.macs()


class Refuses:
    def seconds(self, shape) -> float:
        raise AssertionError("a recorded plan was priced again")


def chain(channels: int = 4, layers: int = 3) -> nn.Sequential:
    """conv3x3-bn-relu, ``layers`` times: merging two 3x3 convolutions into a 5x5 adds MACs."""
    modules: list[nn.Module] = []
    for _ in range(layers):
        modules += [nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU()]
    model = nn.Sequential(*modules, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, 3))
    torch.manual_seed(0)
    randomize_bn(model)
    return model.eval()


X = torch.randn(2, 4, 12, 12, generator=torch.Generator().manual_seed(1))


def _linearized(model: nn.Module, policy: str, table=None) -> nn.Module:
    sites = [s.name for s in trace(model, X).sites][:-1]  # all but the last: the convs may merge
    return tlc.linearize(model, sites, X, policy=policy, table=table)


def test_latency_merges_a_chain_that_macs_keeps_and_stays_exact():
    model = chain()
    by_macs = tlc.merge(_linearized(model, "macs"), X)
    table = CallBound()
    linearized = _linearized(model, "latency", table)
    by_latency = tlc.merge(linearized, X, table=table)
    assert depth(by_macs, X) == 4 and depth(by_latency, X) == 2
    assert tlc.measure(by_latency, X)["macs"] > tlc.measure(by_macs, X)["macs"]
    x = torch.randn(3, 4, 12, 12)
    with torch.no_grad():
        assert rel_err(linearized(x), by_latency(x)) < 1e-5
    assert by_latency.tlc_report.policy == "latency" and set(by_latency.tlc_report.prices) <= set(table.read)


def test_a_latency_plan_is_recorded_and_replayed_on_load_without_pricing(tmp_path):
    model, table = chain(), CallBound()
    deployed = tlc.merge(_linearized(model, "latency", table), X, table=table)
    tlc.save(deployed, tmp_path / "run", example_inputs=X)
    recipe = json.loads((tmp_path / "run" / "recipe.json").read_text())
    assert recipe["policy"] == "latency" and recipe["prices"] == deployed.tlc_report.prices
    with using_table(Refuses()):
        loaded = tlc.load(tmp_path / "run", model=chain(layers=3))
    assert depth(loaded, X) == 2
    with torch.no_grad():
        assert torch.equal(loaded(X), deployed(X))


@pytest.mark.parametrize("prices", [{"conv|x": -1.0}, {"conv|x": "fast"}, [1.0]])
def test_a_tampered_price_record_is_refused(tmp_path, prices):
    table = CallBound()
    tlc.save(tlc.merge(_linearized(chain(), "latency", table), X, table=table), tmp_path / "run", example_inputs=X)
    path = tmp_path / "run" / "recipe.json"
    recipe = json.loads(path.read_text())
    path.write_text(json.dumps({**recipe, "prices": prices}))
    with pytest.raises(SpecError, match="prices must map"):
        tlc.load(tmp_path / "run", model=chain())


def test_a_missing_price_is_a_clear_error():
    linearized = _linearized(chain(), "latency", CallBound())
    with pytest.raises(TLCError, match="no entry for conv"):
        tlc.merge(linearized, X, table={"affine|4x12x12|0|1|||||1|": 1e-5})


def test_merge_warns_when_linearize_planned_the_padding_for_another_policy():
    linearized = _linearized(chain(), "macs")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tlc.merge(linearized, X)  # its own policy: no warning
        assert not caught
        tlc.merge(linearized, X, policy="always")
    assert len(caught) == 1 and "linearized for policy 'macs'" in str(caught[0].message)
    assert "(0..6)" in str(caught[0].message)  # names the segment: convs 0, 3 and 6 would merge


def test_tlc_savings_are_priced_in_time_under_the_latency_policy():
    """Collapsing the first site lets two 3x3 convolutions merge: no MACs saved, one call saved."""
    model = chain(layers=2)
    graph = trace(model, X)
    masks = {s.name: torch.ones(s.channels) for s in graph.sites}
    first = graph.sites[0].name
    assert collapse_savings(model, graph, masks, X, "macs")[(first,)] == 0
    with using_table(CallBound()):
        saved = collapse_savings(model, graph, masks, X, "latency")
    assert saved[(first,)] > 0.2  # of 4 priced ops (2 convs, 2 activations) the collapse saves 2


class Bottlenecks(nn.Module):
    """``count`` width -> 8 -> width bottlenecks. At width 32 "macs" keeps them factorized (2 x 256 < 1024 MACs
    per row), while at batch 1 the time is the calls', so one 32 -> 32 layer each is faster; at width 1024 one
    merged layer does 64x the MACs and is slower."""

    def __init__(self, width: int = 32, count: int = 8):
        super().__init__()
        self.layers = nn.ModuleList([nn.Sequential(nn.Linear(width, 8), nn.ReLU(), nn.Linear(8, width), nn.ReLU())
                                     for _ in range(count)])

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def test_measured_latency_goes_down_where_the_latency_policy_merges(tmp_path):
    torch.manual_seed(0)
    model, x = Bottlenecks().eval(), torch.randn(1, 32)
    sites = [f"layers.{i}.1" for i in range(8)]
    table = LatencyTable(cache_dir=tmp_path, threads=1, budget_s=0.05)
    by_macs = tlc.merge(tlc.linearize(model, sites, x), x)
    by_latency = tlc.merge(tlc.linearize(model, sites, x, policy="latency", table=table), x, table=table)
    assert depth(by_macs, x) == 16 and depth(by_latency, x) == 8
    comparison = tlc.compare(by_macs, by_latency, x, batch_sizes=(1,), threads=1, repeats=50)
    assert comparison.rows[0]["ratio"] > 1.1, str(comparison)
    assert by_latency.tlc_report.clock["kept"] == "latency"  # timed against the macs plan, and kept


class Misprices(LatencyTable):
    """A real table's clock (eager, batch 1, one thread) with made-up prices: every layer costs one call,
    whatever its MACs, so the plan merges every factorized bottleneck into one large layer."""

    def seconds(self, shape) -> float:
        return 1e-4 + 1e-15 * shape.macs()

    estimate = seconds

    def prefetch(self, shapes, progress: bool = True) -> int:
        return 0


def test_a_latency_plan_slower_on_the_clock_than_the_macs_plan_gives_way_to_it(tmp_path):
    """Mispriced, the latency plan merges every bottleneck; timed against the macs plan it loses, so merge
    returns the macs plan, and a saved folder replays that one."""
    torch.manual_seed(0)
    model, x = Bottlenecks(width=1024, count=4).eval(), torch.randn(1, 1024)
    table = Misprices(cache_dir=tmp_path, threads=1)
    linearized = tlc.linearize(model, [f"layers.{i}.1" for i in range(4)], x, policy="latency", table=table)
    unchecked = tlc.merge(linearized, x, table=table, clock_check=False)
    checked = tlc.merge(linearized, x, table=table)
    assert depth(unchecked, x) == 4 and unchecked.tlc_report.clock is None
    report = checked.tlc_report
    assert report.policy == "macs" and report.prices is None and depth(checked, x) == 8
    assert report.clock["kept"] == "macs" and report.clock["ratio"] < 1 and "kept macs" in str(report)
    with torch.no_grad():
        assert rel_err(linearized(x), checked(x)) < 1e-5
    tlc.save(checked, tmp_path / "run", example_inputs=x)
    torch.manual_seed(1)
    loaded = tlc.load(tmp_path / "run", model=Bottlenecks(width=1024, count=4))
    assert depth(loaded, x) == 8
    with torch.no_grad():
        assert torch.equal(loaded(x), checked(x))


class FoldLooksDear:
    """Prices where a batch norm costs nothing and a bias costs a little: priced alone, leaving the batch
    norm beside its conv looks cheaper than folding it (what table noise does to such near-ties)."""

    def seconds(self, shape) -> float:
        if shape.kind in ("affine", "add", "act"):
            return 0.0
        return 1e-4 + (1e-6 if shape.bias else 0.0)


def conv_bn() -> nn.Sequential:
    model = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))
    torch.manual_seed(0)
    randomize_bn(model)
    return model.eval()


def _batch_norms(model: nn.Module) -> int:
    return sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())


def test_a_latency_plan_never_leaves_a_batch_norm_beside_its_conv(tmp_path):
    """Rule 2 folds it whatever the prices; a folder saved under rule 1 (no rule recorded) still replays as
    it was saved, the batch norm left."""
    model = conv_bn()
    deployed = tlc.merge(model, X, policy="latency", table=FoldLooksDear())
    assert _batch_norms(deployed) == 0 and deployed.tlc_report.plan_rule == pricing.PLAN_RULE
    old = tlc.merge(model, X, policy="latency", table=pricing.Fixed(deployed.tlc_report.prices, rule=1))
    assert _batch_norms(old) == 1 and old.tlc_report.plan_rule == 1
    with torch.no_grad():
        assert rel_err(model(X), deployed(X)) < 1e-5 and rel_err(model(X), old(X)) < 1e-5
    for name, form in (("new", deployed), ("old", old)):
        tlc.save(form, tmp_path / name, example_inputs=X)
    path = tmp_path / "old" / "recipe.json"
    recipe = json.loads(path.read_text())
    assert recipe["plan_rule"] == 1
    path.write_text(json.dumps({k: v for k, v in recipe.items() if k != "plan_rule"}))  # saved before rules
    for name, form, norms in (("new", deployed, 0), ("old", old, 1)):
        with using_table(Refuses()):
            loaded = tlc.load(tmp_path / name, model=conv_bn())
        assert _batch_norms(loaded) == norms
        with torch.no_grad():
            assert torch.equal(loaded(X), form(X))
    recipe["plan_rule"] = pricing.PLAN_RULE + 1
    path.write_text(json.dumps(recipe))
    with pytest.raises(SpecError, match="plan_rule must be"):
        tlc.load(tmp_path / "old", model=conv_bn())
