"""Tables of a run's report: the before/after table, the speed change of a latency row, the network map."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import nn

from tlc._inputs import ExampleInputs
from tlc.graph import trace
from tlc.measure.compare import si
from tlc.measure.latency import rebatch


def network_map(original: nn.Module, deployed: nn.Module, example: ExampleInputs,
                collapsed: Iterable[str]) -> list[dict[str, Any]]:
    """The original network in execution order (weight layers and activation sites), each with what
    became of it: a site is "kept" or "collapsed"; a layer names the deploy-form layer it went into. An
    entry inside a module that ``collapsed`` names (a block replaced by the identity) is "removed"."""
    from tlc.ops import Kind

    graph = trace(original, rebatch(example, 1))
    collapsed = set(collapsed)
    into: dict[str, str] = {}
    for record in deployed.tlc_report.records:
        for op in record.replaces:
            into[op[op.index("(") + 1:-1]] = record.name
    site_of = {s.node: s.name for s in graph.all_sites}
    entries = []
    for node in graph.nodes:
        info = graph.info[node]
        if info.kind is Kind.SITE:
            name = site_of[node.name]
            status = "removed" if _inside(name.split("#")[0], collapsed) else \
                "collapsed" if name in collapsed else "kept"
            entries.append({"kind": "site", "name": name, "status": status})
        elif info.kind in (Kind.CONV, Kind.LINEAR):
            owner = info.owner or node.name
            if _inside(owner, collapsed):
                entries.append({"kind": info.kind.value, "name": owner, "into": None, "status": "removed"})
            else:
                entries.append({"kind": info.kind.value, "name": owner, "into": into.get(owner, owner)})
    return entries


def _inside(name: str, modules: set[str]) -> bool:
    """Whether ``name`` (a module or parameter path) lies strictly inside one of ``modules``."""
    parts = name.split(".")
    return any(".".join(parts[:i]) in modules for i in range(1, len(parts)))


def speed_change(row: dict[str, Any]) -> str:
    """``x1.46 faster (ratios 1.40-1.52)`` (or ``slower``) from a latency row, with the interquartile range
    of its per-round ratios; ``no measurable change`` when that range holds 1, and flagged ``noisy`` when
    it spans more than a factor 1.5."""
    ratio = row["ratio"]
    q1, q3 = row.get("ratio_q1"), row.get("ratio_q3")
    if q1 is None or q3 is None:
        return f"x{ratio:.2f} faster" if ratio >= 1 else f"x{1 / ratio:.2f} slower"
    spread = f"ratios {q1:.2f}-{q3:.2f}" + (", noisy" if q3 > 1.5 * q1 else "")
    if q1 <= 1 <= q3:
        return f"no measurable change ({spread})"
    return (f"x{ratio:.2f} faster" if ratio >= 1 else f"x{1 / ratio:.2f} slower") + f" ({spread})"


def _all_unique(before: dict[str, Any], after: dict[str, Any]) -> bool:
    """Whether no weight is shared before or after (unique params equal params: nothing to show)."""
    return before["unique_params"] == before["params"] and after["unique_params"] == after["params"]


def format_table(report: dict[str, Any]) -> str:
    """The before/after table of a report (what ``tlc demo`` and ``tlc report`` print)."""
    before, after = report["original"], report["compressed"]
    rows = []
    for key, label in (("val_accuracy", "val accuracy"), ("test_accuracy", "test accuracy")):
        if key in before:
            rows.append((label, f"{100 * before[key]:.2f}%", f"{100 * after[key]:.2f}%",
                         f"{100 * (after[key] - before[key]):+.2f} pt"))
    for key, label in (("activations", "activations"), ("depth", "depth")):
        rows.append((label, str(before[key]), str(after[key]), f"{after[key] - before[key]:+d}"))
    for key, label in (("params", "params"), ("unique_params", "unique params"), ("weights_bytes", "weights file"),
                       ("macs", "MACs (batch 1)")):
        if key not in before or key not in after or (key == "unique_params" and _all_unique(before, after)):
            continue  # unique params: shown where tied weights make them differ; older reports lack them
        unit = "B" if key == "weights_bytes" else ""
        rows.append((label, si(before[key]) + unit, si(after[key]) + unit,
                     f"x{before[key] / max(after[key], 1):.2f} smaller"))
    if after.get("weight_sparsity", 0.0) > before.get("weight_sparsity", 0.0):  # unstructured pruning: not a speed-up
        rows.append(("weight sparsity", f"{100 * before['weight_sparsity']:.1f}%",
                     f"{100 * after['weight_sparsity']:.1f}%", "zeros kept in dense layers"))
    for row in report["latency"]["rows"]:
        rows.append((f"latency {row['backend']} b{row['batch_size']}", f"{row['a_median_ms']:.2f} ms",
                     f"{row['b_median_ms']:.2f} ms", speed_change(row)))
    width = [max(len(r[i]) for r in rows + [("", "original", "compressed", "change")]) for i in range(4)]
    lines = [f"{'':{width[0]}}  {'original':>{width[1]}}  {'compressed':>{width[2]}}  {'change':>{width[3]}}"]
    lines += [f"{a:{width[0]}}  {b:>{width[1]}}  {c:>{width[2]}}  {d:>{width[3]}}" for a, b, c, d in rows]
    lines.append(f"method: {report.get('method', 'tlc')} ({report.get('preset', 'default')}), "
                 f"steps: {len(report['steps'])}, chosen: {report['chosen_step']}, stop: {report['stop_reason']}, "
                 f"fine-tuning: {report['finetune_epochs_total']:.1f} epochs, wall time {report['wall_time_s']:.0f} s")
    lines += [f"warning: {w}" for w in report.get("warnings", [])]
    return "\n".join(lines)
