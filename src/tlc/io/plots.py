"""PNG plots of a compression run, drawn from its report.json alone (what ``tlc report DIR`` writes).

Every number, label and title comes from the report, so the plots of a run can be redrawn at any time
without the model or the data. matplotlib is an optional dependency; it is used through its Agg
canvas directly, so drawing never changes the pyplot backend of the calling process.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tlc.errors import TLCError

DPI = 150
ACCENT = "#1f4e9a"  # the run's path
CHOSEN = "#e0a100"
BUDGET = "#c0392b"
TEST = "#6a3d9a"
SITE_KEPT = "#d95f02"
SITE_COLLAPSED = "#1b9e77"
LAYER = "#b8b8b8"
REMOVED = "#9a9a9a"  # entries inside a block replaced by the identity
GROUP_COLOURS = ("#1f77b4", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#d62728", "#393b79")


def write_plots(report: dict[str, Any], directory: Path) -> list[Path]:
    """Write the PNG plots of ``report`` into ``directory`` and return their paths.

    Always ``accuracy_vs_activations.png`` and ``accuracy_vs_speedup.png``; ``network_map.png`` too when
    the report has a ``network`` (reports of older versions do not).
    """
    figure, canvas = _matplotlib()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    drawings = [("accuracy_vs_activations.png", _accuracy_vs_activations),
                ("accuracy_vs_speedup.png", _accuracy_vs_speedup)]
    if report.get("network"):
        drawings.append(("network_map.png", _network_map))
    written = []
    for name, draw in drawings:
        fig = figure()
        canvas(fig)
        draw(fig, report)
        path = directory / name
        fig.savefig(path, dpi=DPI)
        written.append(path)
    return written


def _matplotlib() -> tuple[Any, Any]:
    """matplotlib's Figure class and its Agg canvas, or a TLCError saying how to install it."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise TLCError("drawing the plots needs matplotlib, which is not installed: pip install matplotlib "
                       "(or pip install 'tlc[plot]'); --no-plots prints the table only") from exc
    return Figure, FigureCanvasAgg


# ============================================================================ accuracy plots


@dataclass
class _Point:
    """Step 0 (the original) or one compression step, in the units the plots use."""

    step: int
    removed: int  # activations removed so far
    speedup: float
    accuracy: float  # validation accuracy, percent
    depth: int
    accepted: bool
    parent: int  # index of the point this step started from (the last accepted one before it)


def _points(report: dict[str, Any]) -> list[_Point]:
    original = report["original"]
    total = original["activations"]
    points = [_Point(0, 0, 1.0, 100 * original["val_accuracy"], original["depth"], True, 0)]
    parent = 0
    for s in report["steps"]:
        points.append(_Point(s["step"], total - s["activations"], s["speedup"], 100 * s["val_accuracy"],
                             s["depth"], s["accepted"], parent))
        if s["accepted"]:
            parent = len(points) - 1
    return points


def _run_name(report: dict[str, Any]) -> str:
    """``MODEL on DATA`` from the report's specs, as much of it as was recorded."""
    model = report.get("model") or {}
    spec = model.get("spec") if isinstance(model, dict) else None
    return " on ".join(str(v) for v in (spec, report.get("data")) if v)


def _title(report: dict[str, Any], what: str) -> str:
    run = _run_name(report)
    return f"{what}\n{run}" if run else what


def _accuracy_vs_activations(fig: Any, report: dict[str, Any]) -> None:
    """Validation accuracy against activations removed, with the budget, the chosen step, test accuracy."""
    fig.set_size_inches(7.5, 4.8)
    ax = fig.add_subplot()
    points = _points(report)
    total = report["original"]["activations"]
    final_x = total - report["compressed"]["activations"]
    _draw_run(ax, report, points, [p.removed for p in points], final_x, None)
    for p in points[1:]:
        ax.annotate(str(p.step), (p.removed, p.accuracy), xytext=(8, 7), textcoords="offset points",
                    fontsize=7, color="#555555")
    ax.set_xlabel(f"activations removed (of {total})")
    ax.xaxis.get_major_locator().set_params(integer=True)
    most = max([p.removed for p in points] + [final_x])
    ax.set_xlim(-0.5, max(most, 1) + 0.5)  # whole activations, also when no step removed one (pruning)
    top = ax.secondary_xaxis("top", functions=(lambda x: total - x, lambda x: total - x))
    top.xaxis.get_major_locator().set_params(integer=True)
    top.set_xlabel("activations left", fontsize=8)
    top.tick_params(labelsize=8)
    ax.set_title(_title(report, "validation accuracy vs activations removed (numbers: step)"), fontsize=10)
    _finish_axes(fig, ax)


def _accuracy_vs_speedup(fig: Any, report: dict[str, Any]) -> None:
    """Validation accuracy against the measured speed-up, each point labelled with its depth."""
    fig.set_size_inches(7.5, 4.8)
    ax = fig.add_subplot()
    points = _points(report)
    final = _final_latency(report)
    chosen = _chosen(report, points)
    final_x = final["ratio"] if final else chosen.speedup
    _draw_run(ax, report, points, [p.speedup for p in points], final_x, final)
    for i, p in enumerate(points):
        ax.annotate(f"{p.step} (d{p.depth})", (p.speedup, p.accuracy), xytext=(10, 3 if i % 2 == 0 else -10),
                    textcoords="offset points", fontsize=7, color="#555555")
    ax.axvline(1.0, color="#999999", lw=0.8, ls=":")
    ax.set_xlabel("measured speed-up (batch-1 latency of the original / of the compressed model)")
    what = "validation accuracy vs measured speed-up (labels: step (depth in weight layers))"
    ax.set_title(_title(report, what), fontsize=10)
    _finish_axes(fig, ax)


def _final_latency(report: dict[str, Any]) -> dict[str, Any] | None:
    """The final comparison's eager batch-1 row: the same measurement as the per-step speed-ups."""
    rows = (report.get("latency") or {}).get("rows", [])
    return next((r for r in rows if r.get("backend") == "eager" and r.get("batch_size") == 1), None)


def _chosen(report: dict[str, Any], points: list[_Point]) -> _Point:
    step = report.get("chosen_step", 0)
    return next((p for p in points if p.step == step and p.accepted), points[0])


def _draw_run(ax: Any, report: dict[str, Any], points: list[_Point], xs: list[float], final_x: float,
              final_latency: dict[str, Any] | None) -> None:
    """The path of accepted steps, the rejected tries, the budget, the chosen step and the test accuracies."""
    ys = [p.accuracy for p in points]
    path = [i for i, p in enumerate(points) if p.accepted]
    ax.plot([xs[i] for i in path], [ys[i] for i in path], color=ACCENT, lw=1.0, alpha=0.45, zorder=2)
    for i, p in enumerate(points):
        if not p.accepted:
            ax.plot([xs[p.parent], xs[i]], [ys[p.parent], ys[i]], color=ACCENT, lw=0.9, ls=":", alpha=0.7, zorder=2)
    accepted = [i for i in path if i > 0]
    rejected = [i for i, p in enumerate(points) if not p.accepted]
    ax.plot([xs[0]], [ys[0]], "s", color="black", ms=7, zorder=4, label="original (step 0)")
    if accepted:
        ax.plot([xs[i] for i in accepted], [ys[i] for i in accepted], "o", color=ACCENT, ms=6, zorder=4,
                label="accepted step")
    if rejected:
        ax.plot([xs[i] for i in rejected], [ys[i] for i in rejected], "o", mfc="white", mec=ACCENT, mew=1.4, ms=6,
                zorder=4, label="rejected step")
    chosen = _chosen(report, points)
    ax.plot([xs[points.index(chosen)]], [chosen.accuracy], "o", mfc="none", mec=CHOSEN, mew=2.2, ms=14, zorder=5,
            label=f"chosen: step {chosen.step}" + (" (the original)" if chosen.step == 0 else ""))
    _draw_budget(ax, report)
    _draw_final(ax, report, chosen, xs[0], final_x, final_latency)


def _draw_budget(ax: Any, report: dict[str, Any]) -> None:
    drop = (report.get("config") or {}).get("max_acc_drop")
    if drop is None:
        return
    floor = 100 * report["original"]["val_accuracy"] - drop
    ax.axhline(floor, color=BUDGET, lw=1.0, ls="--", zorder=1, label=f"budget: original - {drop:g} pt")


def _draw_final(ax: Any, report: dict[str, Any], chosen: _Point, origin_x: float, final_x: float,
                final_latency: dict[str, Any] | None) -> None:
    """The returned model when it differs from the chosen step (final fine-tune), and the test accuracies."""
    original, compressed = report["original"], report["compressed"]
    final_val = 100 * compressed["val_accuracy"]
    if final_latency is not None or abs(final_val - chosen.accuracy) > 1e-9:
        xerr = None
        if final_latency is not None:
            xerr = [[final_x - final_latency["ratio_q1"]], [final_latency["ratio_q3"] - final_x]]
        what = "final model, val" + (" (speed-up: median, quartiles)" if final_latency is not None else "")
        ax.errorbar([final_x], [final_val], xerr=xerr, fmt="*", color=CHOSEN, mec="black", mew=0.6, ms=11,
                    capsize=3, zorder=6, label=what)
    if "test_accuracy" in original and "test_accuracy" in compressed:
        ax.plot([origin_x, final_x], [100 * original["test_accuracy"], 100 * compressed["test_accuracy"]], "D",
                color=TEST, ms=5, zorder=4, label="test accuracy: original, final model")


def _finish_axes(fig: Any, ax: Any) -> None:
    ax.set_ylabel("accuracy (%)")
    ax.grid(True, color="#e5e5e5", lw=0.6)
    ax.margins(x=0.08, y=0.15)
    ax.legend(fontsize=7.5, loc="best", framealpha=0.9)
    fig.tight_layout()


# ============================================================================ network map

LINE = 0.17  # inches per line of the map
FONT = 7.0  # points
CHAR = 0.602 * FONT / 72  # inches per character of DejaVu Sans Mono at FONT
NAME_CHARS = 36
LABEL_CHARS = 30
RUN_CHARS = 40
MAX_BLOCK = 16  # entries under one heading, at most, when the names allow it
TOP_LEVEL = "(top level)"


@dataclass
class _Line:
    """One line of the map: a heading (``entry`` is None) or an entry of ``report["network"]`` by index."""

    key: str
    entry: int | None = None
    continued: bool = False


@dataclass
class _Layout:
    """Where the map puts things, in inches from the top left corner."""

    columns: list[list[_Line]]
    names: list[str]  # shown name of each entry, relative to its heading
    name_w: float
    column_w: float
    width: float
    head: float  # height of the title, summary and legend
    legend_columns: int

    @property
    def height(self) -> float:
        return self.head + LINE * max(len(c) for c in self.columns) + 0.15


def _display(name: str) -> str:
    """A layer or site name as shown: parameter names lose their ``.weight``."""
    return name.removesuffix(".weight")


def _model_title(spec: Any) -> tuple[str, str]:
    """The model spec and the arguments it was built with (a small Swin is not ``swin_tiny``'s defaults)."""
    if not isinstance(spec, dict):
        return "model", ""
    kwargs = spec.get("kwargs") or {}
    settings = ", ".join(f"{k}={tuple(v) if isinstance(v, list) else v}" for k, v in kwargs.items())
    return str(spec.get("spec", "model")), settings if len(settings) <= 110 else settings[:109] + "…"


def _shorten(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters, keeping its end (the most specific part of a dotted name)."""
    return text if len(text) <= limit else "…" + text[len(text) - limit + 1:]


def _block_keys(names: list[str]) -> list[str]:
    """The heading of each name: its prefix at the coarsest dotted depth that keeps blocks small.

    Names no deeper than that depth fall under their parent ("" at the top level), so ``layer1.0.conv1``
    goes under ``layer1`` and ``fc`` under the top level.
    """
    parts = [n.split(".") for n in names]
    choices = []
    for d in range(1, max(len(p) for p in parts)):
        keys = [".".join(p[:d] if len(p) > d else p[:-1]) for p in parts]
        longest = max(_runs(keys))
        if longest <= MAX_BLOCK:
            return keys
        choices.append((longest, d, keys))
    return min(choices)[2] if choices else [""] * len(names)


def _runs(keys: list[str]) -> list[int]:
    """Lengths of the runs of equal consecutive keys."""
    lengths = [1]
    for a, b in zip(keys, keys[1:]):
        if a == b:
            lengths[-1] += 1
        else:
            lengths.append(1)
    return lengths


def _lines(keys: list[str]) -> list[_Line]:
    """Entries in order, a heading wherever the block changes (none at all when no name has a block)."""
    lines: list[_Line] = []
    headed = any(keys)
    for i, key in enumerate(keys):
        if headed and (i == 0 or keys[i - 1] != key):
            lines.append(_Line(key))
        lines.append(_Line(key, i))
    return lines


def _columns(lines: list[_Line]) -> list[list[_Line]]:
    """The lines in as few columns as their number asks for, of even height, broken before headings."""
    per_column = max(36, math.ceil(math.sqrt(10 * len(lines))))
    count = math.ceil(len(lines) / per_column)
    height = math.ceil(len(lines) / count)
    while len(columns := _pack(lines, height)) > count:
        height += 1
    return columns


def _pack(lines: list[_Line], height: int) -> list[list[_Line]]:
    """Fill columns of ``height`` lines, ending a column before a heading in its last third when there is one;
    a block cut in two gets its heading again, marked continued."""
    lines = list(lines)
    headed = lines[0].entry is None
    columns, start = [], 0
    while start < len(lines):
        end = min(start + height, len(lines))
        if end < len(lines):
            heads = [j for j in range(max(start + 1, end - height // 3), end + 1) if lines[j].entry is None]
            end = heads[-1] if heads else end
        columns.append(lines[start:end])
        if headed and end < len(lines) and lines[end].entry is not None:
            lines.insert(end, _Line(lines[end].key, continued=True))
        start = end
    return columns


def _groups(entries: list[dict[str, Any]]) -> dict[str, list[int]]:
    """Deploy layer -> indices of the two or more weight layers merged into it."""
    members: dict[str, list[int]] = {}
    for i, e in enumerate(entries):
        if e["kind"] != "site" and e.get("status") != "removed":
            members.setdefault(e.get("into", e["name"]), []).append(i)
    return {into: idx for into, idx in members.items() if len(idx) > 1}


def _group_label(into: str, report: dict[str, Any]) -> tuple[str, str]:
    """Shortened deploy-layer name and the layer it is (from ``report["merge"]``, when listed)."""
    layer = next((m.get("layer", "") for m in report.get("merge") or [] if m.get("name") == into), "")
    return _shorten(into.removeprefix("tlc_merged."), LABEL_CHARS), _shorten(layer, LABEL_CHARS)


def _relative(name: str, key: str) -> str:
    return name[len(key) + 1:] if key and name.startswith(key + ".") else name


def _layout(entries: list[dict[str, Any]], labels: dict[str, tuple[str, str]], legend_items: int) -> _Layout:
    full = [_display(e["name"]) for e in entries]
    keys = _block_keys(full)
    names = [_shorten(_relative(n, k), NAME_CHARS) for n, k in zip(full, keys)]
    name_w = CHAR * max(len(n) for n in names)
    label_w = CHAR * max((len(t) for pair in labels.values() for t in pair), default=0)
    column_w = 0.3 + name_w + (0.45 + label_w if labels else 0.1) + 0.2
    columns = _columns(_lines(keys))
    width = max(8.0, 0.2 + column_w * len(columns))
    legend_columns = legend_items if width >= 11 else 3
    head = 0.72 + 0.19 * math.ceil(legend_items / legend_columns)
    return _Layout(columns, names, name_w, column_w, width, head, legend_columns)


def _network_summary(entries: list[dict[str, Any]], groups: dict[str, list[int]]) -> str:
    kinds = Counter(e["kind"] for e in entries)
    status = Counter(e.get("status") for e in entries if e["kind"] == "site")
    layers = [e for e in entries if e["kind"] != "site"]
    kept_layers = [e for e in layers if e.get("status") != "removed"]
    deploy = len({e.get("into", e["name"]) for e in kept_layers})
    removed = len(layers) - len(kept_layers)
    gone = f", {status['removed']} removed" if status["removed"] else ""
    return (f"{kinds['site']} activation sites: {status['kept']} kept, {status['collapsed']} collapsed{gone}; "
            f"{len(layers)} weight layers -> {deploy} deploy layers ({len(groups)} merged from 2 or more"
            + (f", {removed} removed with their block" if removed else "") + ")")


def _network_map(fig: Any, report: dict[str, Any]) -> None:
    """The original network in execution order, in columns: sites kept/collapsed, merged layers bracketed."""
    entries = report["network"]
    groups = _groups(entries)
    labels = {into: _group_label(into, report) for into in groups}
    legend = _map_legend(entries, groups)
    layout = _layout(entries, labels, len(legend))
    fig.set_size_inches(layout.width, layout.height)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(0, layout.width)
    ax.set_ylim(layout.height, 0)
    ax.axis("off")
    where = _draw_columns(ax, entries, layout)
    colours = dict(zip(groups, _cycle(GROUP_COLOURS, len(groups))))
    for into, members in groups.items():
        _draw_group(ax, [where[i] for i in members], colours[into], labels[into], entries, members, layout.name_w)
    left, inch = 0.2 / layout.width, 1 / layout.height
    run = _run_name(report)
    title = f"network map{' of ' + _shorten(run, RUN_CHARS) if run else ''} (execution order: read down each column)"
    fig.text(left, 1 - 0.12 * inch, title, fontsize=10, va="top")
    fig.text(left, 1 - 0.4 * inch, _network_summary(entries, groups), fontsize=8, va="top")
    fig.legend(handles=legend, loc="upper left", bbox_to_anchor=(left, 1 - 0.58 * inch), ncol=layout.legend_columns,
               fontsize=7.5, frameon=False, handletextpad=0.4, columnspacing=1.4, borderaxespad=0, borderpad=0)


def _draw_columns(ax: Any, entries: list[dict[str, Any]], layout: _Layout) -> dict[int, tuple[float, float]]:
    """Headings and entries, column by column; returns where each entry went (x of its column, y)."""
    where = {}
    for c, column in enumerate(layout.columns):
        x = 0.2 + c * layout.column_w
        for r, line in enumerate(column):
            y = layout.head + (r + 0.5) * LINE
            if line.entry is None:
                text = (line.key or TOP_LEVEL) + (" (continued)" if line.continued else "")
                ax.text(x, y, _shorten(text, int(layout.column_w / CHAR) - 2), fontsize=FONT, family="monospace",
                        weight="bold", va="center")
            else:
                where[line.entry] = (x, y)
                _draw_entry(ax, entries[line.entry], layout.names[line.entry], x, y)
    return where


def _cycle(colours: tuple[str, ...], n: int) -> list[str]:
    return [colours[i % len(colours)] for i in range(n)]


def _layer_marker(ax: Any, kind: str, x: float, y: float, fill: str, edge: str) -> None:
    ax.plot([x], [y], "s" if kind == "conv" else "D", ms=5.5 if kind == "conv" else 5, mfc=fill, mec=edge, mew=0.6)


def _draw_entry(ax: Any, entry: dict[str, Any], name: str, x: float, y: float) -> None:
    if entry.get("status") == "removed":  # inside a block replaced by the identity: hollow and grey
        marker = "o" if entry["kind"] == "site" else "s" if entry["kind"] == "conv" else "D"
        ax.plot([x + 0.15], [y], marker, ms=5, mfc="white", mec=REMOVED, mew=1.0)
        ax.text(x + 0.3, y, name, fontsize=FONT, family="monospace", va="center", color=REMOVED)
        return
    if entry["kind"] == "site":
        kept = entry.get("status") != "collapsed"
        colour = SITE_KEPT if kept else SITE_COLLAPSED
        ax.plot([x + 0.15], [y], "o", ms=5.5, mfc=colour if kept else "white", mec=colour, mew=1.3)
    else:
        colour = "black"
        _layer_marker(ax, entry["kind"], x + 0.15, y, LAYER, "#555555")
    ax.text(x + 0.3, y, name, fontsize=FONT, family="monospace", va="center", color=colour)


def _draw_group(ax: Any, places: list[tuple[float, float]], colour: str, label: tuple[str, str],
                entries: list[dict[str, Any]], members: list[int], name_w: float) -> None:
    """Fill the members in the group colour and join them, column by column, with a bracket; label the first."""
    pieces: dict[float, list[float]] = {}
    for (x, y), i in zip(places, members):
        _layer_marker(ax, entries[i]["kind"], x + 0.15, y, colour, "black")
        pieces.setdefault(x, []).append(y)
    for n, (x, ys) in enumerate(pieces.items()):
        bx = x + 0.3 + name_w + 0.2
        top, bottom = min(ys) - 0.05, max(ys) + 0.05
        ax.plot([bx, bx], [top, bottom], color=colour, lw=1.6, solid_capstyle="butt")
        for y in ys:
            ax.plot([bx - 0.1, bx], [y, y], color=colour, lw=1.0)
        if n == 0:
            middle = (top + bottom) / 2
            ax.text(bx + 0.08, middle - 0.055, label[0], fontsize=FONT, family="monospace", color=colour,
                    va="center", weight="bold")
            ax.text(bx + 0.08, middle + 0.075, label[1], fontsize=FONT - 0.5, family="monospace", color="#444444",
                    va="center")


def _map_legend(entries: list[dict[str, Any]], groups: dict[str, list[int]]) -> list[Any]:
    from matplotlib.lines import Line2D

    kinds = {e["kind"] for e in entries}
    handles = []
    if "conv" in kinds:
        handles.append(Line2D([], [], ls="", marker="s", ms=5.5, mfc=LAYER, mec="#555555", label="conv layer"))
    if "linear" in kinds:
        handles.append(Line2D([], [], ls="", marker="D", ms=5, mfc=LAYER, mec="#555555", label="linear layer"))
    handles.append(Line2D([], [], ls="", marker="o", ms=5.5, mfc=SITE_KEPT, mec=SITE_KEPT, label="activation kept"))
    handles.append(Line2D([], [], ls="", marker="o", ms=5.5, mfc="white", mec=SITE_COLLAPSED, mew=1.3,
                          label="activation collapsed"))
    if any(e.get("status") == "removed" for e in entries):
        handles.append(Line2D([], [], ls="", marker="s", ms=5, mfc="white", mec=REMOVED, mew=1.0,
                              label="removed with its block (replaced by the identity)"))
    if groups:
        handles.append(Line2D([], [], color=GROUP_COLOURS[0], lw=1.6, marker="s", ms=5.5, mfc=GROUP_COLOURS[0],
                              mec="black", label="layers merged into one deploy layer (its name, its layer)"))
    return handles


# ============================================================================ benchmark (methods side by side)

MARKERS = ("o", "^", "v", "D", "P", "h", "<", ">", "p", "*", "d")
METHOD_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#7f7f7f",
                  "#393b79")  # no red: red is the width-pruning baseline's and the budget's


def write_benchmark_plot(summary: dict[str, Any], path: Path) -> Path:
    """The Pareto plot of a ``tlc benchmark``: validation accuracy against the measured speed-up over the
    original (left) and against the model size (right), one marker per contender, the original, the
    batch-norm-folded original and the accuracy budget."""
    figure, canvas = _matplotlib()
    fig = figure(figsize=(12.5, 5.2))
    canvas(fig)
    key = benchmark_speed_key(summary)
    rows = [r for r in summary["rows"] if r["status"] == "done" and "latency" in r]
    left, right = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    scale, unit = (1e6, "million") if max((r["unique_params"] for r in rows), default=0) >= 1e6 else (1e3, "thousand")
    for i, row in enumerate(rows):
        style = _benchmark_style(row, i)
        speed = row["latency"][key]["speedup"]["original"]
        accuracy = 100 * row["val_accuracy"]
        spread = [[speed["ratio"] - speed["q1"]], [speed["q3"] - speed["ratio"]]]
        left.errorbar([speed["ratio"]], [accuracy], xerr=spread, capsize=3, label=_benchmark_label(row), **style)
        right.plot([row["unique_params"] / scale], [accuracy], linestyle="none", **style)
    original = summary["rows"][0]
    folded = original.get("latency_bn_folded", {}).get(key)
    if folded is not None:
        left.axvline(folded["speedup"]["original"]["ratio"], color="#777777", lw=0.9, ls="-.",
                     label="original, batch norms folded")
    floor = 100 * original["val_accuracy"] - float(summary["settings"]["run"].get("max_acc_drop", 1.0))
    right.axhline(floor, color=BUDGET, lw=1.0, ls="--", zorder=1)
    for ax in (left, right):
        ax.set_ylabel("validation accuracy (%)")
        ax.grid(True, color="#e5e5e5", lw=0.6)
        ax.margins(x=0.12, y=0.2)
    left.axhline(floor, color=BUDGET, lw=1.0, ls="--", zorder=1, label="accuracy budget")
    backend, batch = key.split("@")
    left.set_xlabel(f"measured speed-up over the original ({backend}, batch {batch}; bars: quartiles)")
    right.set_xlabel(f"model size ({unit} unique parameters)")
    left.set_title("accuracy vs speed-up (right is faster)", fontsize=10)
    right.set_title("accuracy vs size (left is smaller)", fontsize=10)
    left.legend(fontsize=7.5, loc="best", framealpha=0.9)
    skipped = [f"{r['label']}: {_shorten(r['reason'], 70)}" for r in summary["rows"] if r["status"] != "done"]
    name, settings = _model_title(summary.get("model"))
    title = f"methods side by side on {name} ({summary.get('data') or 'data'})"
    fig.suptitle(title + (f"\n{settings}" if settings else ""), fontsize=11)
    if skipped:
        fig.text(0.01, 0.01, "not run: " + "; ".join(skipped), fontsize=7, color="#555555")
    fig.tight_layout(rect=(0, 0.04 if skipped else 0, 1, 0.93))
    fig.savefig(path, dpi=DPI)
    return path


def benchmark_speed_key(summary: dict[str, Any]) -> str:
    """The latency row the plot and the headline use: ONNX Runtime at batch 1 when it was measured (what a
    deployment runs), eager batch 1 otherwise."""
    keys = [f"{r['backend']}@{r['batch_size']}" for r in summary["lineup"]["rows"]]
    return "onnxruntime@1" if "onnxruntime@1" in keys else keys[0]


def _benchmark_style(row: dict[str, Any], index: int) -> dict[str, Any]:
    if row["kind"] == "original":
        return {"marker": "s", "color": "black", "ms": 8}
    if row["kind"] == "width":
        return {"marker": "X", "color": "#d62728", "ms": 10, "mec": "black", "mew": 0.6}
    return {"marker": MARKERS[index % len(MARKERS)], "color": METHOD_COLOURS[index % len(METHOD_COLOURS)], "ms": 8}


def _benchmark_label(row: dict[str, Any]) -> str:
    if row["kind"] == "original":
        return f"original (depth {row['depth']})"
    unchanged = "" if row.get("changed") else ", unchanged"
    return f"{row['label']} (depth {row['depth']}{unchanged})"
