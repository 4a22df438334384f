"""Regenerate docs/results.md (tables, plots) from the benchmarks' summaries in benchmarks/results/.

    python benchmarks/results.py [--results benchmarks/results] [--out docs]

Nothing in docs/results.md is written by hand: every number comes from a summary written by
benchmarks/vision.py, nlp.py, swin.py or ranking_stability.py.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from collections import Counter
from pathlib import Path
from typing import Any

TARGETS = {  # (minimum speed-up at batch 1 and 64, maximum accuracy drop in points)
    "fashion-mnist/mobilenet_v2": (1.5, 1.0),
    "fashion-mnist/resnet18": (1.3, 1.0),
    "rotten-tomatoes/MiniLM-L6": (1.3, 1.0),
}

COMMANDS = Path(__file__).with_name("run_all.sh")
RESULTS = Path(__file__).with_name("results")


def _acc(side: dict[str, Any]) -> float:
    return 100 * side.get("test_accuracy", side["val_accuracy"])


def _latency(report: dict[str, Any]) -> dict[tuple[str, int], dict[str, float]]:
    return {(r["backend"], r["batch_size"]): r for r in report["latency"]["rows"]}


def _target(name: str) -> tuple[float, float] | None:
    for key, value in TARGETS.items():
        if name.startswith(key):
            return value
    return None


def run_rows(summary: dict[str, Any]) -> list[str]:
    rows = []
    for preset, report in summary["runs"].items():
        o, c = report["original"], report["compressed"]
        lat = _latency(report)
        cells = []
        for backend in ("eager", "onnxruntime"):
            for batch in (1, 64):
                row = lat.get((backend, batch))
                cells.append(f"x{row['ratio']:.2f}" if row else "-")
        rows.append(
            f"| {summary['name']} | {preset} | {_acc(o):.2f} | {_acc(c):.2f} | {_acc(c) - _acc(o):+.2f} | "
            f"{o['activations'] - c['activations']}/{o['activations']} | {o['depth']} -> {c['depth']} | "
            f"{o['params'] / 1e6:.2f}M -> {c['params'] / 1e6:.2f}M | "
            f"{o['macs'] / 1e6:.1f}M -> {c['macs'] / 1e6:.1f}M | "
            + " | ".join(cells) + f" | {report['wall_time_s'] / 60:.0f} min | {report['finetune_epochs_total']:.2f} |")
    return rows


def _ratio(row: dict[str, Any] | None) -> str:
    """``x1.52 (1.48-1.57)``: a side-by-side latency ratio with the quartiles of its rounds."""
    if not row:
        return "-"
    spread = f" ({row['ratio_q1']:.2f}-{row['ratio_q3']:.2f})" if row.get("ratio_q1") is not None else ""
    return f"x{row['ratio']:.2f}{spread}"


def headline_lines(summaries: list[dict[str, Any]]) -> list[str]:
    """One row per compression benchmark: its default (or only) run against the original and against the
    original with its batch norms folded, eager batch 1, measured side by side."""
    lines = ["Each benchmark's default run (or its only one): test top-1 before and after, depth, MACs reduction, "
             "and the batch-1 eager latency ratio against the original and against the original with only its "
             "batch norms folded, measured side by side (median of interleaved rounds, their quartiles in "
             "brackets); then ONNX Runtime at batch 1 and the run's larger batch against the original, which ONNX "
             "Runtime runs with its batch norms folded, so this is also the ratio against the BN-folded original "
             "(- where the run did not time ONNX Runtime). Details and every other run below.", "",
             "| benchmark | method (preset) | top-1 original -> compressed | depth | MACs | eager b1 vs original "
             "| eager b1 vs BN-folded original | ORT b1 vs BN-folded | ORT large batch vs BN-folded |",
             "|---|---|---|---|---|---|---|---|---|"]
    for summary in summaries:
        runs = summary.get("runs") or {}
        preset = "default" if "default" in runs else next(iter(runs), None)
        if preset is None:
            continue
        report = runs[preset]
        o, c = report["original"], report["compressed"]
        folded = {r["batch_size"]: r for r in (summary.get("vs_bn_folded", {}).get(preset) or {}).get("rows", [])
                  if r.get("backend", "eager") == "eager"}
        lines.append(f"| {summary['name']} | {report.get('method', 'tlc')} ({preset}) | {_acc(o):.2f} -> {_acc(c):.2f} "
                     f"({_acc(c) - _acc(o):+.2f} pt) | {o['depth']} -> {c['depth']} | "
                     f"x{o['macs'] / max(c['macs'], 1):.2f} | {_ratio(_latency(report).get(('eager', 1)))} | "
                     f"{_ratio(folded.get(1))} | {_onnx(report, small=True)} | {_onnx(report, small=False)} |")
    return lines


def _onnx(report: dict[str, Any], small: bool) -> str:
    """ONNX Runtime's ratio at batch 1 (``small``) or at the largest batch the run timed, with that batch."""
    batches = sorted(b for backend, b in _latency(report) if backend == "onnxruntime")
    if not batches or (not small and batches[-1] == 1):
        return "-"
    batch = batches[0] if small else batches[-1]
    return _ratio(_latency(report)[("onnxruntime", batch)]) + ("" if small else f" (b{batch})")


def _clock(row: dict[str, Any]) -> str:
    """What merge's clock check kept, with its ratio (macs/latency), or why there is none."""
    if "clock" not in row:
        return ""
    if row["clock"] is None:
        return "same layers: not timed"
    return f"kept {row['clock']['kept']} (x{row['clock']['ratio']:.2f})"


def latency_policy_lines(item: dict[str, Any]) -> list[str]:
    """The latency policy against "macs" on the zoo, and the table's predictions against measured latency."""
    lines = ["## The latency merge policy", "",
             "`benchmarks/latency_policy.py`: random weights and batch-norm statistics, all or a seeded half of the "
             "sites linearized, merged under `macs` and under `latency` (an eager CPU table at batch 1, "
             f"{item['machine']['threads']} thread(s)); both deploy forms measured side by side, interleaved: "
             "the ratio macs/latency (above 1: the latency plan is faster) with the quartiles of its rounds. "
             "*Clock check*: where the latency plan differed from the `macs` plan of the same training form, `merge` "
             "timed both and kept the faster (its ratio; rows without it predate the check).", "",
             "| model | sites | depth macs -> latency | MACs macs -> latency | eager b1 macs/latency | clock check |",
             "|---|---|---|---|---|---|"]
    for r in item["policy"]:
        lines.append(f"| {r['model']} | {r['sites']} ({r['linearized']}) | {r['macs_depth']} -> {r['latency_depth']} "
                     f"| {r['macs_macs'] / 1e6:.1f}M -> {r['latency_macs'] / 1e6:.1f}M | {_ratio(r)} "
                     f"| {_clock(r)} |")
    rows = item.get("prediction", [])
    if rows:
        worst = max(rows, key=lambda r: r["error"])
        lines += ["", f"The table's predicted latency of a whole model against its measured latency, {len(rows)} cases "
                  "(BN-folded original and the all-sites latency deploy form of each model; eager and ONNX Runtime; "
                  "batch 1 and 32). *Table alone*: the sum of the model's layer times. *Anchored*: the deploy "
                  "form predicted from the measured original, `predict(form, x, reference=(original, seconds))`, "
                  "its latency times the ratio of the two sums. Errors: " + "; ".join(
                      _error_summary(rows, key, batch) for key in ("error", "anchored_error")
                      for batch in sorted({r["batch_size"] for r in rows}))
                  + f". Worst alone: {100 * worst['error']:.0f}% ({worst['model']} {worst['form']}, "
                  f"{worst['backend']} b{worst['batch_size']}).", "",
                  "| model | form | backend | batch | measured ms | table alone ms | error | anchored ms | error |",
                  "|---|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['model']} | {r['form']} | {r['backend']} | {r['batch_size']} | {r['measured_ms']:.3f} | "
                  f"{r['predicted_ms']:.3f} | {100 * r['error']:.0f}% | " + (
                      f"{r['anchored_ms']:.3f} | {100 * r['anchored_error']:.0f}% |" if "anchored_ms" in r
                      else "(reference) | |") for r in rows]
    return lines + [""]


def _error_summary(rows: list[dict[str, Any]], key: str, batch: int) -> str:
    """'anchored, batch 1: median 9% (worst 46%, 12 cases)' over the rows that have `key`."""
    errors = sorted(r[key] for r in rows if r["batch_size"] == batch and key in r)
    what = "anchored" if key == "anchored_error" else "table alone"
    return (f"{what}, batch {batch}: median {100 * statistics.median(errors):.0f}% (worst {100 * max(errors):.0f}%, "
            f"{len(errors)} cases)")


def target_lines(summary: dict[str, Any]) -> list[str]:
    target = _target(summary["name"])
    if target is None:
        return []
    speed, drop = target
    lines = []
    for preset, report in summary["runs"].items():
        lat = _latency(report)
        loss = _acc(report["original"]) - _acc(report["compressed"])
        eager = [lat[("eager", b)]["ratio"] for b in (1, 64) if ("eager", b) in lat]
        met = loss <= drop and eager and min(eager) >= speed
        lines.append(f"- {summary['name']} ({preset}): target x{speed} at <= {drop} pt; measured "
                     f"{', '.join(f'x{r:.2f}' for r in eager)} (eager b1, b64) at a top-1 change of {-loss:+.2f} pt: "
                     f"**{'met' if met else 'missed'}**")
    return lines


def _speed(report: dict[str, Any]) -> float:
    """The smaller of the eager batch-1 and batch-64 speed-ups: the point a user can count on."""
    lat = _latency(report)
    return min(lat[("eager", b)]["ratio"] for b in (1, 64) if ("eager", b) in lat)


def preset_comparison_lines(summaries: list[dict[str, Any]]) -> list[str]:
    """The default-against-paper target: an equal or better accuracy and speed point for at most a fifth of
    the paper preset's fine-tuning compute. Every default run is set against every paper run that started
    from the same base model, whatever variant (``--tag``) each was."""
    by_base: dict[str, dict[str, list[tuple[str, dict[str, Any]]]]] = {}
    for summary in summaries:
        if "runs" not in summary or "base" not in summary:
            continue
        group = by_base.setdefault(json.dumps(summary["base"], sort_keys=True), {"default": [], "paper": []})
        for preset, report in summary["runs"].items():
            group[preset].append((summary["name"], report))
    return [_comparison_line(default, paper)
            for group in by_base.values() for default in group["default"] for paper in group["paper"]]


def _comparison_line(default: tuple[str, dict[str, Any]], paper: tuple[str, dict[str, Any]]) -> str:
    (d_name, d), (p_name, p) = default, paper
    acc = {"default": _acc(d["compressed"]), "paper": _acc(p["compressed"])}
    speed = {"default": _speed(d), "paper": _speed(p)}
    compute = {"default": d["finetune_epochs_total"], "paper": p["finetune_epochs_total"]}
    short = [what for what, ok in (("top-1", acc["default"] >= acc["paper"]),
                                   ("speed-up", speed["default"] >= speed["paper"]),
                                   ("compute", 5 * compute["default"] <= compute["paper"])) if not ok]
    verdict = f"missed ({', '.join(short)})" if short else "met"
    return (f"- {d_name} default against {p_name} paper: top-1 {acc['default']:.2f} vs {acc['paper']:.2f}, "
            f"speed-up x{speed['default']:.2f} vs x{speed['paper']:.2f} (eager, worse of b1/b64), fine-tuning "
            f"{compute['default']:.2f} vs {compute['paper']:.2f} epochs "
            f"(target: both at least as good, at most a fifth of the compute): **{verdict}**")


def finetune_alone_lines(item: dict[str, Any]) -> list[str]:
    """One line per preset: the base model's top-1 before and after its per-step fine-tuning alone."""
    base = item["base"]
    lines = []
    for preset, row in item["finetune_alone"].items():
        r = row["recipe"]
        lines.append(
            f"- {item['name']} ({preset}: {row['epochs']:.2f} epochs, {r['optimizer']} lr {r['lr']:g} {r['schedule']}"
            f"{', distilled' if row.get('distill') else ''}):"
            f" validation {100 * base['val_accuracy']:.2f} -> {100 * row['val_accuracy']:.2f}, test "
            f"{100 * base['test_accuracy']:.2f} -> {100 * row['test_accuracy']:.2f} "
            f"({100 * (row['test_accuracy'] - base['test_accuracy']):+.2f} pt)")
    return lines


def _rejected(ax: Any, points: list[tuple[int, float, str, str]], floor: float) -> None:
    """Rejected steps as open markers; one far below the kept ones (a collapsed network) sits on the
    panel's lower edge as a down-pointing marker labelled with its accuracy, so it does not flatten the rest."""
    labelled = set()
    for x, y, color, preset in points:
        label = None if preset in labelled else f"{preset}: rejected steps"
        labelled.add(preset)
        if y >= floor:
            ax.scatter([x], [y], facecolors="none", edgecolors=color, label=label)
        else:
            ax.scatter([x], [floor], marker="v", facecolors="none", edgecolors=color, label=label)
            ax.annotate(f"{y:.1f}%", (x, floor), textcoords="offset points", xytext=(4, 2), fontsize=7)
    if any(y < floor for _, y, _, _ in points):
        ax.set_ylim(bottom=floor - 0.5)


def steps_plot(summaries: list[dict[str, Any]], out: Path) -> Path | None:
    """Accuracy against activations removed, one panel per benchmark (three to a row), default and paper
    presets; rejected steps as open markers."""
    vision = [s for s in summaries if "runs" in s]
    if not vision:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(len(vision), 3)
    rows = -(-len(vision) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 4 * rows), squeeze=False)
    for ax in axes.flat[len(vision):]:
        ax.set_visible(False)
    for ax, summary in zip(axes.flat, vision):
        budget = 100 * next(iter(summary["runs"].values()))["original"]["val_accuracy"] - 1.0
        kept_ys = [budget]
        rejected_points = []
        for preset, report in summary["runs"].items():
            total = report["original"]["activations"]
            xs = [0] + [total - s["activations"] for s in report["steps"] if s["accepted"]]
            ys = [100 * report["original"]["val_accuracy"]] + [100 * s["val_accuracy"]
                                                              for s in report["steps"] if s["accepted"]]
            kept_ys += ys
            line, = ax.plot(xs, ys, marker="o", label=f"{preset} ({report['finetune_epochs_total']:.1f} ft epochs)")
            rejected_points += [(total - s["activations"], 100 * s["val_accuracy"], line.get_color(), preset)
                                for s in report["steps"] if not s["accepted"]]  # tried from the last kept model
        _rejected(ax, rejected_points, floor=min(kept_ys) - 3.0)
        ax.axhline(budget, color="grey", linestyle="--", linewidth=1, label="budget (-1 pt)")
        ax.set_title(summary["name"])
        ax.set_xlabel("activations removed")
        ax.set_ylabel("validation top-1 (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / "img" / "results_accuracy_vs_layers_removed.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def swin_section(summary: dict[str, Any]) -> list[str]:
    o, c = summary["original"], summary["compressed"]
    lat = {(r["backend"], r["batch_size"]): r for r in summary["latency"]["rows"]}
    lines = [f"### {summary['name']}: every GELU collapsed and merged (random weights)", "",
             "| | depth | params | MACs | activations |", "|---|---|---|---|---|",
             f"| original | {o['depth']} | {o['params'] / 1e6:.2f}M | {o['macs'] / 1e9:.2f}G | {o['activations']} |",
             f"| merged | {c['depth']} | {c['params'] / 1e6:.2f}M | {c['macs'] / 1e9:.2f}G | {c['activations']} |",
             "", f"Max relative error of the merged model: {summary['max_relative_error']:.1e}. Latency ratio "
             "(original / merged, median of interleaved runs): "
             + ", ".join(f"{b} b{n} x{r['ratio']:.2f}" for (b, n), r in sorted(lat.items())), ""]
    return lines


def methods_lines(items: list[dict[str, Any]], out: Path) -> list[str]:
    """The "Methods side by side" section: each ``benchmarks/methods.py`` table and its Pareto plot."""
    from tlc.report.benchmark import markdown_benchmark

    if not items:
        return []
    lines = ["", "## Methods side by side", "",
             "`benchmarks/methods.py` (`tlc benchmark`): every method's default preset on the same base, with the "
             "same budget, fine-tuning recipe, epochs per step and step limit, and Torch-Pruning's width pruning "
             "matched to the MACs of the best depth result; all timed side by side in one interleaved session. "
             "Speed-ups: latency of the original / of the model, median of the per-round ratios (quartiles); "
             "\"vs BN-folded\": against the original with its batch norms folded.", ""]
    for item in items:
        summary, args = item["benchmark"], item["args"]
        timing = summary["timing"]
        lines += [f"### {item['name']}", "",
                  f"`python benchmarks/methods.py --model {args['model']}` — fine-tuning "
                  f"{summary['settings']['run']['finetune']['epochs']:g} epoch(s) per step, at most "
                  f"{args['max_steps']} steps, budget {args['max_acc_drop']:g} pt; timed at {timing['threads']} "
                  f"thread(s), {timing['rounds']} rounds of {timing['burst']} calls.", "",
                  markdown_benchmark(summary["rows"]), ""]
        lines += _width_comparison(summary["rows"])
        plot = out / "img" / f"{item['name']}.png"
        if plot.is_file():
            lines += [f"![{item['name']}]({os.path.relpath(plot, out)})", ""]
    return lines


def _width_comparison(rows: list[dict[str, Any]]) -> list[str]:
    """One sentence per width baseline: its ONNX Runtime speed-ups and accuracy against the depth result it
    was matched to (same MACs, same fine-tuning epochs)."""
    by_label = {r["label"]: r for r in rows}
    lines = []
    for width in (r for r in rows if r["kind"] == "width" and r["status"] == "done"):
        depth = by_label.get(width["matched_to"])
        if depth is None:
            continue
        keys = [k for k in width.get("latency", {}) if k.startswith("onnxruntime@") and k in depth.get("latency", {})]
        speeds = "; ".join(f"{k.replace('onnxruntime@', 'batch ')}: x{_speedup(depth, k):.2f} against "
                           f"x{_speedup(width, k):.2f}" for k in keys)
        lines += [f"At equal MACs ({width['macs'] / 1e6:.1f}M) and fine-tuning epochs, {depth['label']} against "
                  f"{width['label']} on ONNX Runtime: {speeds}; validation accuracy "
                  f"{100 * depth['val_accuracy']:.2f}% against {100 * width['val_accuracy']:.2f}%, depth "
                  f"{depth['depth']} against {width['depth']}.", ""]
    return lines


def _speedup(row: dict[str, Any], key: str) -> float:
    """The row's median speed-up over the original at one backend@batch."""
    return row["latency"][key]["speedup"]["original"]["ratio"]


def machine_line(summaries: list[dict[str, Any]]) -> str:
    """The machine the summaries were measured on, with the torch threads of each benchmark when they differ."""
    machine = summaries[0]["machine"]
    threads = {s["name"]: s["machine"]["threads"] for s in summaries}
    usual = Counter(threads.values()).most_common(1)[0][0]
    others = ", ".join(f"{n}: {t}" for n, t in threads.items() if t != usual)
    thread_text = f"{usual} torch thread(s)" + (f" ({others})" if others else "")
    return (f"Machine: {machine['cpu']}, {thread_text}, torch {machine['torch']}, Python {machine['python']}, "
            f"tlc {machine['tlc']}" + (f", GPU {machine['cuda']}" if machine.get("cuda") else ", no GPU") + ".")


def render(results: Path, out: Path) -> str:
    everything = [json.loads(p.read_text()) for p in sorted(results.glob("*.json"))]
    methods = [s for s in everything if "benchmark" in s]
    summaries = [s for s in everything if "stability" not in s and "finetune_alone" not in s and "policy" not in s
                 and "benchmark" not in s]
    policy = [s for s in everything if "policy" in s]
    stability = [s for s in everything if "stability" in s]
    alone = [s for s in everything if "finetune_alone" in s]
    if not summaries:
        raise SystemExit(f"no summaries in {results}: run the benchmarks first (benchmarks/run_all.sh)")
    lines = ["# Results", "",
             "Generated by `benchmarks/results.py` from the summaries the benchmark scripts write; "
             "do not edit by hand.",
             "", machine_line(summaries), "",
             *headline_lines(summaries), "",
             "## Commands", "", "```bash", COMMANDS.read_text().strip(), "```", "",
             "## Compression runs", "",
             "Top-1 on the test split (before/after), activations removed out of the total, depth (weight layers on "
             "the longest path), params, MACs (batch 1), latency ratio original/compressed measured side by side "
             "(interleaved), wall time of the whole compression, fine-tuning compute in epochs. A suffix after the "
             "model names a variant: `-ft1` (`--tag`) other fine-tuning settings on the same base model, `-e15` "
             "(`--base-tag`) a base model trained otherwise; its command is listed above.", "",
             "| benchmark | preset | top-1 before | after | change (pt) | activations removed | depth | params | MACs "
             "| eager b1 | eager b64 | ORT b1 | ORT b64 | wall time | fine-tune epochs |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    runs = [summary for summary in summaries if "runs" in summary]
    for summary in runs:
        lines += run_rows(summary)
    if not runs:
        lines += ["", "No compression benchmark has finished yet: their summaries are not in benchmarks/results/."]
    lines += ["", "### How each run ended", ""] if runs else []
    for summary in runs:
        for preset, report in summary["runs"].items():
            lines.append(f"- {summary['name']} ({preset}): {len(report['steps'])} step(s), chose step "
                         f"{report['chosen_step']}; stopped: {report['stop_reason']}")
    lines += ["", "### Base models", ""]
    for summary in summaries:
        if "base" in summary:
            b = summary["base"]
            recipe = {k: b["recipe"][k] for k in ("optimizer", "lr", "schedule", "batch_size")}
            lines.append(f"- {summary['name']}: {b['epochs']:.0f} epochs ({b['train_seconds'] / 60:.0f} min), "
                         f"validation {100 * b['val_accuracy']:.2f}%, test {100 * (b['test_accuracy'] or 0):.2f}%; "
                         f"recipe {json.dumps(recipe)}")
    lines += ["", "### Against the batch-norm-folded original", "",
              "How much of the speed-up folding batch norms alone gives: the compressed model against the original "
              "with only its batch norms folded (eager).", ""]
    for summary in summaries:
        for preset, cmp in summary.get("vs_bn_folded", {}).items():
            ratios = ", ".join(f"b{r['batch_size']} x{r['ratio']:.2f}" for r in cmp["rows"])
            lines.append(f"- {summary['name']} ({preset}): {ratios}")
    if stability:
        lines += ["", "### Ranking stability", "",
                  "Loss-gap ranking of every site measured on two calibration samples (seeds 0 and 1) of the "
                  "validation data (`benchmarks/ranking_stability.py`): Spearman rank correlation and overlap of "
                  "the five best sites.", ""]
        for item in stability:
            for size, row in item["stability"].items():
                lines.append(f"- {item['name']}, {size} samples: Spearman {row['spearman']:.3f}, "
                             f"top-5 overlap {row['top5_overlap']}/5 ({item['sites']} sites)")
    if alone:
        lines += ["", "### Fine-tuning alone", "",
                  "Each preset's per-step fine-tuning applied once to the base model with nothing collapsed "
                  "(`vision.py --finetune-alone`): how much of a step's accuracy change the recipe causes by "
                  "itself. The accuracies before each arrow are of the base model it started from, retrained "
                  "where the runs folder was gone: seeded training was not bit-identical across sessions "
                  "here, so they can differ from the Base models line.", ""]
        for item in alone:
            lines += finetune_alone_lines(item)
    lines += ["", "## Targets", ""]
    for summary in summaries:
        lines += target_lines(summary)
    lines += preset_comparison_lines(summaries)
    plot = steps_plot(summaries, out)
    if plot is not None:
        lines += ["", "## Accuracy against activations removed", "",
                  f"![accuracy vs layers removed]({os.path.relpath(plot, out)})", ""]
    for summary in summaries:
        if "runs" not in summary and "latency" in summary:
            lines += swin_section(summary)
    for item in policy:
        lines += latency_policy_lines(item)
    lines += methods_lines(methods, out)
    lines += distributed_lines(results)
    return "\n".join(lines) + "\n"


def distributed_lines(results: Path) -> list[str]:
    """"Many processes": TLC's ranking and one fine-tuning timed with 1 and N CPU processes under torchrun
    (benchmarks/distributed.py), and the accuracy a fine-tuning reaches with each."""
    path = results / "distributed-scaling.json"
    if not path.is_file():
        return []
    item = json.loads(path.read_text())
    lines = ["", "## Many processes", "",
             "`tlc compress`'s ranking and fine-tuning under torchrun (gloo, one torch thread per process): one TLC "
             "ranking of the base model (median of repeats) and one fine-tuning epoch (global batch 64), each as "
             "wall seconds on rank 0 between barriers and as CPU seconds of the busiest process (the wall time on "
             "idle cores: the machine's cores were shared with other work, load average in the JSON), with the "
             "validation top-1 the fine-tuning reaches. The sites every process count selects are compared with "
             "one process; with one process the fine-tuning is repeated with another seed, the spread that a "
             "change of the number of processes is to be compared with.", "", "```bash", item["command"], "```", "",
             "| model | processes | ranking wall (s) | ranking CPU (s) | speed-up (CPU) | fine-tuning wall (s) "
             "| fine-tuning CPU (s) | speed-up (CPU) | val top-1 after fine-tuning | selected sites |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for model, rows in item["distributed"].items():
        one = rows.get("1")
        for n, row in rows.items():
            rank, fit = row["ranking_median"], row["finetune"][0]
            base_rank, base_fit = (one or row)["ranking_median"], (one or row)["finetune"][0]
            same = one is not None and row["selected"] == one["selected"]
            lines.append(f"| {model} | {n} | {rank['wall_s']:.2f} | {rank['cpu_s']:.2f} | "
                         f"x{base_rank['cpu_s'] / rank['cpu_s']:.2f} | {fit['wall_s']:.1f} | {fit['cpu_s']:.1f} | "
                         f"x{base_fit['cpu_s'] / fit['cpu_s']:.2f} | {100 * fit['val_accuracy']:.2f}% | "
                         f"{'the same as 1 process' if same else ', '.join(row['selected'])} |")
        if one is not None and len(one["finetune"]) > 1:
            a, b = one["finetune"][:2]
            change = 100 * (b["val_accuracy"] - a["val_accuracy"])
            lines.append(f"| {model} | 1, seed {b['seed']} | | | | {b['wall_s']:.1f} | {b['cpu_s']:.1f} | | "
                         f"{100 * b['val_accuracy']:.2f}% ({change:+.2f} pt) | |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--out", type=Path, default=Path("docs"))
    args = parser.parse_args()
    text = render(args.results, args.out)
    (args.out / "results.md").write_text(text)
    print(f"wrote {args.out / 'results.md'}")


if __name__ == "__main__":
    main()
