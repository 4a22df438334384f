"""Every method on one model, side by side: ``tlc.benchmark`` and ``tlc benchmark``.

Each method (with its preset) compresses the same trained base, on the same data, with the same accuracy
budget, fine-tuning recipe, step limit and seed, each in its own folder under ``OUT/runs/``; a killed
benchmark resumes where it stopped (a finished method is loaded back, an interrupted one resumes from its
last step). Optional width-pruning baselines (:mod:`tlc.run.peers`) prune the same base to the MACs of the
best depth result and fine-tune it for the same epochs. Then every result, the original and the original
with its batch norms folded are timed in one interleaved session (:func:`tlc.measure.compare.line_up`), so
that their speed-ups are comparable. ``OUT/benchmark.json`` holds the table, ``OUT/pareto.png`` the plot.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

import tlc
from tlc._inputs import ExampleInputs, to_device
from tlc.errors import SpecError, TLCError
from tlc.io.recipe import load, weights_bytes
from tlc.measure import activations, count_macs, count_params, depth, rebatch
from tlc.measure.compare import LineUp, line_up
from tlc.methods.base import available_methods, method_class
from tlc.run.config import RunConfig
from tlc.run.data import calibration_batches, example_batch
from tlc.surgery.merge import merge
from tlc.train import FitConfig, evaluate
from tlc.train.checkpoint import atomic_write_json, read_json
from tlc.train.distributed import barrier, is_main_process, on_main

STATE = "benchmark-state.json"
SUMMARY = "benchmark.json"
PLOT = "pareto.png"
REFERENCES = ("original", "bn-folded")
FORMAT = "tlc-benchmark"


@dataclass(frozen=True)
class Entry:
    """One contender: a registered method with one of its presets."""

    method: str
    preset: str = "default"

    @property
    def label(self) -> str:
        return self.method if self.preset == "default" else f"{self.method}:{self.preset}"

    @property
    def folder(self) -> str:
        return f"{self.method}-{self.preset}"


def parse_entries(specs: Sequence[str] | None) -> list[Entry]:
    """``["tlc", "lacoot:paper"]`` as entries, checked before any work (every registered method with its
    default preset when ``specs`` is None or empty); a repeated entry is refused."""
    names = list(specs) if specs else available_methods()
    entries = []
    for spec in names:
        method, _, preset = spec.partition(":")
        cls = method_class(method)
        preset = preset or "default"
        if preset not in cls.presets:
            raise SpecError(f"method {method} has no preset {preset!r} (presets: {', '.join(cls.presets)})")
        entries.append(Entry(cls.name, preset))
    repeated = {e.label for e in entries if entries.count(e) > 1}
    if repeated:
        raise SpecError(f"methods listed twice: {', '.join(sorted(repeated))}")
    return entries


@dataclass
class Timing:
    """How the results are timed side by side: batch 1 and ``batch_size``, on each backend; ``repeats`` calls
    of each model in ``rounds`` interleaved rounds (more than a two-model comparison: a sub-millisecond model
    timed in a handful of short bursts varies by tens of percent from one session to the next)."""

    batch_size: int = 32
    backends: tuple[str, ...] = ("eager", "onnxruntime")
    threads: int | None = None
    repeats: int = 80
    rounds: int = 10

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.repeats < 1 or self.rounds < 1:
            raise ValueError(f"timing needs batch_size, repeats and rounds >= 1, got {self.batch_size}, "
                             f"{self.repeats}, {self.rounds}")
        unknown = [b for b in self.backends if b not in ("eager", "onnxruntime")]
        if unknown or not self.backends:
            raise ValueError(f"timing backends must be eager and/or onnxruntime, got {list(self.backends)}")

    @property
    def batch_sizes(self) -> tuple[int, ...]:
        return (1,) if self.batch_size == 1 else (1, self.batch_size)


@dataclass
class Contest:
    """What every contender shares: the base model, the data, the settings, where results go."""

    model: nn.Module
    train_data: Dataset
    val_data: Dataset
    test_data: Dataset | None
    collate_fn: Callable | None
    example_inputs: ExampleInputs
    out_dir: Path
    overrides: dict[str, Any]
    device: str = "cpu"
    progress: bool = True
    model_spec: dict[str, Any] | None = None
    data_spec: str | None = None
    log: Callable[[str], None] = print

    def folder(self, name: str) -> Path:
        return self.out_dir / "runs" / name


@dataclass
class BenchmarkResult:
    """What :func:`benchmark` returns: one row per contender (the original first), the side-by-side timing
    and the files written."""

    rows: list[dict[str, Any]]
    timing: dict[str, Any]
    summary_path: Path
    plot_path: Path | None
    models: dict[str, nn.Module] = field(default_factory=dict)

    def __str__(self) -> str:
        from tlc.report.benchmark import format_benchmark

        return format_benchmark(self.rows, self.timing)


# ============================================================================ entry point


def benchmark(
    model: nn.Module,
    train_data: Dataset,
    val_data: Dataset,
    *,
    out_dir: str | Path,
    methods: Sequence[str] | None = None,
    baselines: Sequence[str] = (),
    resume: bool = False,
    timing: Timing | None = None,
    test_data: Dataset | None = None,
    collate_fn: Callable | None = None,
    example_inputs: ExampleInputs | None = None,
    device: str = "cpu",
    progress: bool = True,
    model_spec: dict[str, Any] | None = None,
    data_spec: str | None = None,
    log: Callable[[str], None] | None = print,
    **overrides: Any,
) -> BenchmarkResult:
    """Compress ``model`` with every method in ``methods`` (``"NAME"`` or ``"NAME:PRESET"``; default: every
    registered method, default preset) under the same shared settings ``overrides`` (``max_acc_drop``,
    ``finetune``, ``max_steps``, ``seed``, ... as for :func:`tlc.compress`), add the width-pruning
    ``baselines`` (``"torch-pruning"``, ``"torch-pruning-taylor"``: needs the ``peers`` extra), then time
    them all side by side with the original. Resumable with ``resume=True``."""
    entries = parse_entries(methods)
    check_baselines(baselines)
    own = sorted(set(overrides) - set(_run_overrides(overrides)))
    if own:
        raise SpecError(f"benchmark settings are shared by every method; {', '.join(own)} "
                        f"{'is not a run setting' if len(own) == 1 else 'are not run settings'} (RunConfig)")
    timing = timing or Timing()
    dev = torch.device(device)
    example = to_device(example_inputs if example_inputs is not None else example_batch(val_data, collate_fn), dev)
    main = is_main_process()  # under torchrun every rank runs every method; rank 0 alone logs, times and writes
    contest = Contest(copy.deepcopy(model).to(dev).eval(), train_data, val_data, test_data, collate_fn, example,
                      Path(out_dir), dict(overrides), device, progress and main, model_spec, data_spec,
                      (log if main else None) or (lambda _message: None))
    state = _open(contest, entries, baselines, timing, resume)
    models = {"original": contest.model, "bn-folded": merge(contest.model, example, policy="never")}
    for entry in entries:
        _run_entry(contest, entry, state, models)
    for name in baselines:
        _run_baseline(contest, name, state, models)
    rows = [_original_row(contest, state)] + [state["entries"][e.label] for e in entries] \
        + [state["entries"][name] for name in baselines]
    lineup = _time_side_by_side(contest, models, timing) if main else _untimed(models)
    barrier()
    _add_latency(rows, lineup, timing)
    summary = {"format": FORMAT, "tlc_version": tlc.__version__, "model": model_spec, "data": data_spec,
               "settings": state["settings"], "timing": {**dataclasses.asdict(timing), **lineup.settings},
               "rows": rows, "lineup": lineup.to_dict()}
    summary_path, plot_path = _write_summary(contest.out_dir, summary)
    return BenchmarkResult(rows, summary["timing"], summary_path, plot_path, models)


# ============================================================================ state and resume


def _settings(contest: Contest, entries: list[Entry], baselines: Sequence[str], timing: Timing) -> dict[str, Any]:
    """What a resumed benchmark must share with the interrupted one (JSON form)."""
    return json.loads(json.dumps({
        "methods": [e.label for e in entries], "baselines": list(baselines), "model": contest.model_spec,
        "data": contest.data_spec, "train": len(contest.train_data), "val": len(contest.val_data),
        "params": count_params(contest.model), "batch_size": timing.batch_size, "backends": list(timing.backends),
        "run": contest.overrides,
    }, default=_jsonable))


def _jsonable(value: Any) -> Any:
    return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else str(value)


def _open(contest: Contest, entries: list[Entry], baselines: Sequence[str], timing: Timing,
          resume: bool) -> dict[str, Any]:
    """The benchmark's state: new, or the interrupted one in ``out_dir`` when resuming (same settings). Rank 0
    reads and writes the state file and every rank gets its answer (or its refusal)."""
    settings = _settings(contest, entries, baselines, timing)
    return on_main(_open_state, contest, settings, resume)


def _open_state(contest: Contest, settings: dict[str, Any], resume: bool) -> dict[str, Any]:
    """`_open` on rank 0: check, read or create the state file."""
    path = contest.out_dir / STATE
    if path.is_file():
        if not resume:
            raise SpecError(f"{contest.out_dir} already holds a benchmark; pass resume=True (--resume) to "
                            "continue it, or choose another output directory")
        state = read_json(path)
        changed = _changed(state.get("settings", {}), settings)
        if changed:
            raise SpecError(f"{contest.out_dir} holds a benchmark with other settings ({', '.join(changed)}); "
                            "rerun it as it was started, or choose another output directory")
        state["settings"] = settings  # the contenders may grow: a method or a baseline added to a finished benchmark
        contest.log(f"resuming the benchmark in {contest.out_dir}: "
                    f"{sum(1 for r in state['entries'].values() if r.get('status'))} contender(s) done")
        return state
    if resume:
        contest.log("nothing to resume: starting a new benchmark")
    contest.out_dir.mkdir(parents=True, exist_ok=True)
    state = {"format": FORMAT, "settings": settings, "entries": {}}
    atomic_write_json(path, state)
    return state


def _changed(before: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """The shared settings that differ (the run settings by their own names); the list of contenders may
    change: the finished ones are reused, the new ones run."""
    flat = [{**{k: v for k, v in d.items() if k not in ("run", "methods", "baselines")}, **(d.get("run") or {})}
            for d in (before, now)]
    return sorted(k for k in flat[0].keys() | flat[1].keys() if flat[0].get(k) != flat[1].get(k))


def _save_state(contest: Contest, state: dict[str, Any]) -> None:
    if is_main_process():
        atomic_write_json(contest.out_dir / STATE, state)
    barrier()


# ============================================================================ contenders


def _run_entry(contest: Contest, entry: Entry, state: dict[str, Any], models: dict[str, nn.Module]) -> None:
    """Run one method (or load its finished result) and record its row; one that could not run is tried
    again when the benchmark resumes (a refusal costs little, and its cause may have been fixed)."""
    folder = contest.folder(entry.folder)
    row = state["entries"].get(entry.label)
    if row and row["status"] == "done":
        contest.log(f"{entry.label}: done earlier, loading {folder}")
        models[entry.label] = load(folder, model=contest.model, device=contest.device)
        return
    contest.log(f"=== {entry.label} ===")
    began = time.perf_counter()
    try:
        result = tlc.compress(
            contest.model, contest.train_data, contest.val_data, method=entry.method, preset=entry.preset,
            test_data=contest.test_data, collate_fn=contest.collate_fn, example_inputs=contest.example_inputs,
            out_dir=folder, resume=(folder / "checkpoints").is_dir(), device=contest.device,
            progress=contest.progress, model_spec=contest.model_spec, data_spec=contest.data_spec,
            log=contest.log, **contest.overrides)
    except TLCError as exc:
        reason = _reason(exc)
        contest.log(f"{entry.label}: cannot run on this model: {reason}")
        state["entries"][entry.label] = _failed_row(entry.label, entry.method, entry.preset, reason,
                                                    time.perf_counter() - began)
    else:
        models[entry.label] = result.model
        state["entries"][entry.label] = _method_row(entry, result.report, folder, contest.out_dir)
    _save_state(contest, state)


def _reason(exc: TLCError) -> str:
    """The first line of a refusal, for its row (the error's type when it says nothing)."""
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def _method_row(entry: Entry, report: dict[str, Any], folder: Path, out_dir: Path) -> dict[str, Any]:
    """The row of a finished method, from its report."""
    after = report["compressed"]
    changed = report["chosen_step"] > 0 or bool(report.get("edits"))
    return {
        "label": entry.label, "method": entry.method, "preset": entry.preset, "kind": "depth",
        "status": "done", "changed": changed,
        "reason": "" if report["chosen_step"] > 0 else f"no step kept: {report['stop_reason']}",
        "stop_reason": report["stop_reason"],
        **_shape(after), "val_accuracy": after["val_accuracy"], "test_accuracy": after.get("test_accuracy"),
        "finetune_epochs": report["finetune_epochs_total"], "wall_time_s": report["wall_time_s"],
        "steps": len(report["steps"]), "chosen_step": report["chosen_step"],
        "folder": str(folder.relative_to(out_dir)),
    }


def _shape(stats: dict[str, Any]) -> dict[str, Any]:
    return {k: stats.get(k) for k in ("depth", "activations", "params", "unique_params", "macs", "weights_bytes")}


def _failed_row(label: str, method: str, preset: str, reason: str, seconds: float,
                kind: str = "depth") -> dict[str, Any]:
    return {"label": label, "method": method, "preset": preset, "kind": kind, "status": "failed",
            "changed": False, "reason": reason, "wall_time_s": seconds}


def _original_row(contest: Contest, state: dict[str, Any]) -> dict[str, Any]:
    """The original's row (accuracies evaluated once and kept in the state)."""
    if "original" not in state:
        accuracy = {key: evaluate(contest.model, split, collate_fn=contest.collate_fn, device=contest.device)[
            "accuracy"] if split is not None else None
            for key, split in (("val_accuracy", contest.val_data), ("test_accuracy", contest.test_data))}
        one = rebatch(contest.example_inputs, 1)
        state["original"] = {
            "label": "original", "method": None, "preset": None, "kind": "original", "status": "done",
            "changed": False, "reason": "", "depth": depth(contest.model, one),
            "activations": activations(contest.model, one), "params": count_params(contest.model, unique=False),
            "unique_params": count_params(contest.model), "macs": count_macs(contest.model, one),
            "weights_bytes": weights_bytes(contest.model), **accuracy}
        _save_state(contest, state)
    return state["original"]


# ============================================================================ width-pruning baselines


def check_baselines(baselines: Sequence[str]) -> None:
    """Known names, and the optional package installed, before any work."""
    if not baselines:
        return
    from tlc.run.peers import BASELINES, require_torch_pruning

    unknown = [b for b in baselines if b not in BASELINES]
    if unknown:
        raise SpecError(f"unknown baseline {unknown[0]!r} (known: {', '.join(BASELINES)})")
    if len(set(baselines)) != len(baselines):
        raise SpecError("a baseline is listed twice")
    require_torch_pruning()


def best_depth_row(rows: Sequence[dict[str, Any]], original: dict[str, Any]) -> dict[str, Any] | None:
    """The depth result a width baseline is matched to: the shallowest finished result with fewer MACs than
    the original (fewest MACs among equals); None when no method saved MACs."""
    done = [r for r in rows if r.get("kind") == "depth" and r["status"] == "done" and r["macs"] < original["macs"]]
    return min(done, key=lambda r: (r["depth"], r["macs"])) if done else None


def _run_baseline(contest: Contest, name: str, state: dict[str, Any], models: dict[str, nn.Module]) -> None:
    """Prune the base to the MACs of the best depth result, fine-tune it for the same epochs; its row."""
    from tlc.run.peers import BASELINES, WidthJob, run_width_baseline

    original = _original_row(contest, state)
    best = best_depth_row(list(state["entries"].values()), original)
    if best is None:
        state["entries"][name] = _failed_row(name, "torch-pruning", BASELINES[name],
                                             "no method result has fewer MACs than the original to match", 0.0,
                                             kind="width")
        _save_state(contest, state)
        return
    contest.log(f"=== {name}: pruned to the MACs of {best['label']} ({best['macs'] / 1e6:.2f}M), "
                f"{best['finetune_epochs']:.2f} fine-tuning epochs ===")
    job = WidthJob(contest.model, contest.train_data, contest.val_data, contest.test_data, contest.collate_fn,
                   contest.example_inputs, _calibration(contest), _width_finetune(contest, best),
                   int(best["macs"]), seed=int(contest.overrides.get("seed", 0)), device=contest.device,
                   progress=contest.progress, log=contest.log)
    folder = contest.folder(name)
    try:
        pruned, record = run_width_baseline(name, job, folder)
    except TLCError as exc:
        reason = _reason(exc)
        contest.log(f"{name}: cannot run on this model: {reason}")
        state["entries"][name] = _failed_row(name, "torch-pruning", BASELINES[name], reason, 0.0, kind="width")
    else:
        models[name] = pruned
        state["entries"][name] = {
            "label": name, "method": "torch-pruning", "preset": record["importance"], "kind": "width",
            "status": "done", "changed": True, "matched_to": best["label"],
            "reason": "" if record["reached"] else "the target MACs were not reached",
            **_shape({**record, "unique_params": record["params"], "weights_bytes": weights_bytes(pruned)}),
            "val_accuracy": record["val_accuracy"], "test_accuracy": record["test_accuracy"],
            "finetune_epochs": record["finetune_epochs"], "wall_time_s": record["wall_time_s"],
            "folder": str(folder.relative_to(contest.out_dir))}
    _save_state(contest, state)


def _calibration(contest: Contest) -> list:
    """The calibration batches the shared run settings give (what Taylor importance takes gradients on)."""
    config = RunConfig(**_run_overrides(contest.overrides))
    return calibration_batches(contest.val_data, config, contest.collate_fn, torch.device(contest.device))


def _run_overrides(overrides: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(RunConfig)}
    return {k: v for k, v in overrides.items() if k in names}


def _width_finetune(contest: Contest, best: dict[str, Any]) -> FitConfig:
    """The fine-tuning of the matched depth result (its recipe), for the epochs it used in all."""
    report = read_json(contest.out_dir / best["folder"] / "report.json")
    recipe = FitConfig(**{k: v for k, v in report["config"]["finetune"].items()
                          if k in {f.name for f in dataclasses.fields(FitConfig)}})
    return dataclasses.replace(recipe, epochs=float(best["finetune_epochs"]))


# ============================================================================ timing and outputs


def _time_side_by_side(contest: Contest, models: dict[str, nn.Module], timing: Timing) -> LineUp:
    contest.log(f"timing {len(models)} models side by side ({', '.join(timing.backends)}; batch "
                f"{' and '.join(map(str, timing.batch_sizes))})")
    return line_up(models, contest.example_inputs, references=REFERENCES, batch_sizes=timing.batch_sizes,
                   backends=timing.backends, repeats=timing.repeats, rounds=timing.rounds,
                   device=contest.device, threads=timing.threads, progress=contest.log)


def _untimed(models: dict[str, nn.Module]) -> LineUp:
    """What ranks other than 0 hold under torchrun: rank 0 alone times (one session, no contention)."""
    return LineUp(list(models), list(REFERENCES), {}, {}, 1, [], {})


def _add_latency(rows: list[dict[str, Any]], lineup: LineUp, timing: Timing) -> None:
    """Each timed row gets ``latency[backend@batch] = {median_ms, speedup: {reference: ratio, q1, q3}}``."""
    for row in rows:
        if row["label"] not in lineup.labels:
            continue
        row["latency"] = {f"{r['backend']}@{r['batch_size']}": r["models"][row["label"]] for r in lineup.rows}
    bn = {f"{r['backend']}@{r['batch_size']}": r["models"]["bn-folded"] for r in lineup.rows}
    rows[0]["latency_bn_folded"] = bn


def _write_summary(out_dir: Path, summary: dict[str, Any]) -> tuple[Path, Path | None]:
    """benchmark.json and the Pareto plot (rank 0 only); the plot is skipped with a note without matplotlib."""
    path, plot = out_dir / SUMMARY, out_dir / PLOT
    if is_main_process():
        atomic_write_json(path, summary)
        from tlc.io.plots import write_benchmark_plot

        try:
            write_benchmark_plot(summary, plot)
        except TLCError as exc:
            print(f"note: no plot: {exc}")
            plot = None
    barrier()
    return path, plot


def read_benchmark(directory: str | Path) -> dict[str, Any]:
    """The checked ``benchmark.json`` of a benchmark folder."""
    path = Path(directory) / SUMMARY
    if not path.is_file():
        raise SpecError(f"no {SUMMARY} in {directory}: not a finished tlc benchmark")
    summary = read_json(path)
    if not isinstance(summary, dict) or summary.get("format") != FORMAT or not isinstance(summary.get("rows"), list):
        raise SpecError(f"{path} is not a tlc benchmark summary")
    return summary


__all__ = ["BenchmarkResult", "Entry", "Timing", "benchmark", "best_depth_row", "check_baselines", "parse_entries",
           "read_benchmark"]
