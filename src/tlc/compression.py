"""The whole loop: rank -> collapse -> fine-tune -> evaluate, until the accuracy budget is spent.

``tlc.compress(model, train_data, val_data)`` returns the most compressed model that stays within
the budget, merged into its deploy form and verified, with every step recorded. With ``out_dir`` each
step is checkpointed (atomically), so ``resume=True`` continues an interrupted run and ends with the
same result as an uninterrupted one with the same seed.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset
from torch.utils.data import default_collate as _default_collate

import tlc
from tlc._inputs import ExampleInputs, to_device
from tlc.errors import SpecError, TLCError
from tlc.graph import trace
from tlc.io.recipe import check_reload, save
from tlc.measure import compare, count_macs, count_params, depth
from tlc.measure.compare import si
from tlc.measure.latency import rebatch
from tlc.methods.tlc import NoCandidate, Selection, TLCConfig, select
from tlc.surgery.linearize import linearize, restore
from tlc.surgery.merge import merge
from tlc.train import evaluate, fit
from tlc.train.checkpoint import (
    atomic_write_json,
    atomic_write_text,
    latest_complete,
    load_checkpoint,
    remove_checkpoint,
    save_checkpoint,
)

METHODS = ("tlc",)
CHECKPOINT_PREFIX = "step_"


@dataclass
class StepRecord:
    """One compression step: what was collapsed, what it cost, what it gave."""

    step: int
    sites: list[str]
    removed_channels: int
    linearized_channels: int
    joint_gap: float
    val_accuracy: float
    val_loss: float
    within_budget: bool
    accepted: bool
    activations: int
    params: int
    macs: int
    depth: int
    speedup: float
    finetune_epochs: float
    seconds: float
    note: str = ""
    whole_branches: list[str] = field(default_factory=list)  # sites collapsed all off: their branch became a bias


@dataclass
class CompressionResult:
    """What ``compress`` returns: the deploy form, the training form it came from, and the record."""

    model: nn.Module
    training_model: nn.Module
    original: dict[str, Any]
    compressed: dict[str, Any]
    steps: list[StepRecord]
    stop_reason: str
    chosen_step: int
    report: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        return format_table(self.report)


# ============================================================================ data helpers


def _collate(collate_fn: Callable | None) -> Callable:
    return collate_fn or _default_collate


def _batch(data: Dataset, indices: Sequence[int], collate_fn: Callable | None) -> Any:
    return _collate(collate_fn)([data[i] for i in indices])


def example_batch(data: Dataset, collate_fn: Callable | None = None, size: int = 2) -> ExampleInputs:
    """The inputs of the first ``size`` samples of ``data`` (used to trace and verify merges)."""
    if len(data) == 0:
        raise SpecError("the validation data is empty")
    inputs, _ = _batch(data, range(min(size, len(data))), collate_fn)
    return inputs


def calibration_batches(data: Dataset, config: TLCConfig, collate_fn: Callable | None,
                        device: torch.device) -> list[tuple[Any, torch.Tensor]]:
    """A fixed, non-augmented calibration set: a seeded sample of the validation data, in batches."""
    n = min(config.calibration_size, len(data))
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(config.seed))[:n].tolist()
    size = config.calibration_batch_size
    batches = []
    for start in range(0, n, size):
        inputs, labels = _batch(data, order[start:start + size], collate_fn)
        batches.append((to_device(inputs, device), labels.to(device)))
    return batches


def _derive(seed: int, step: int) -> int:
    return (seed * 1_000_003 + step * 7_919) % (2**31 - 1)


# ============================================================================ measurement


def _structure(model: nn.Module, example: ExampleInputs) -> dict[str, int]:
    one = rebatch(example, 1)
    return {"params": count_params(model), "macs": count_macs(model, one), "depth": depth(model, one),
            "activations": len(trace(model, one).sites)}


def _speedup(original: nn.Module, deployed: nn.Module, example: ExampleInputs, repeats: int, device: str) -> float:
    cmp = compare(original, deployed, example, batch_sizes=(1,), repeats=repeats, warmup=3, rounds=5, device=device)
    return float(cmp.rows[0]["ratio"])


def _channels(selection: Selection) -> tuple[int, int]:
    removed = sum(int((m == 0).sum()) for m in selection.masks.values())
    total = sum(int(m.numel()) for m in selection.masks.values())
    return removed, total - removed


# ============================================================================ checkpoints


@dataclass
class _State:
    step: int = 0
    record: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    best_step: int = 0
    best_record: dict[str, Any] = field(default_factory=dict)
    baseline: dict[str, Any] = field(default_factory=dict)
    stop_reason: str = ""
    fingerprint: str = ""
    set_aside: list[str] = field(default_factory=list)  # sites of rejected steps, not tried again
    elapsed_s: float = 0.0  # wall time of the run up to this checkpoint, across resumes


def _fingerprint(config: TLCConfig, extra: dict[str, Any]) -> str:
    return json.dumps({"config": asdict(config), **extra}, sort_keys=True, default=str)


# Settings that only decide when the run ends: a resumed run may change them (stop a long run early, or
# let one that reached max_steps go on: the checks made before a step are not stored, only made again),
# since the steps already done do not depend on them.
STOP_SETTINGS = ("max_steps", "target_macs_ratio", "target_speedup", "stop_accuracy", "min_activations",
                 "budget_patience", "final_finetune_epochs")


def _same_run(stored: str, current: str) -> bool:
    """Whether a checkpoint's fingerprint names this run. Settings that a newer tlc added count as the
    same when they hold their default, so a run started by an older version still resumes; the
    :data:`STOP_SETTINGS` may differ."""
    if stored == current:
        return True
    old, new = json.loads(stored), json.loads(current)
    defaults = json.loads(json.dumps(asdict(TLCConfig()), default=str))
    added = set(new["config"]) - set(old["config"])
    if any(new["config"][k] != defaults[k] for k in added):
        return False
    new["config"] = {k: v for k, v in new["config"].items() if k not in added and k not in STOP_SETTINGS}
    old["config"] = {k: v for k, v in old["config"].items() if k not in STOP_SETTINGS}
    return old == new


def _save_state(directory: Path, state: _State, model: nn.Module | None, start: float) -> None:
    state.elapsed_s = time.perf_counter() - start
    tensors = {k: v for k, v in model.state_dict().items()} if model is not None else {}
    save_checkpoint(directory, f"{CHECKPOINT_PREFIX}{state.step:03d}", tensors=tensors, state=asdict(state))


def _load_state(directory: Path, fingerprint: str) -> tuple[_State, dict[str, torch.Tensor]] | None:
    name = latest_complete(directory, CHECKPOINT_PREFIX)
    if name is None:
        return None
    tensors, raw, _ = load_checkpoint(directory, name)
    state = _State(**raw)
    if not _same_run(state.fingerprint, fingerprint):
        raise SpecError(f"cannot resume from {directory}: it was started with other settings, model or data; "
                        "use another --out directory or the same options")
    return state, tensors


def _step_weights(directory: Path, step: int) -> dict[str, torch.Tensor]:
    tensors, _, _ = load_checkpoint(directory, f"{CHECKPOINT_PREFIX}{step:03d}")
    return tensors


# ============================================================================ the loop


def compress(
    model: nn.Module,
    train_data: Dataset,
    val_data: Dataset,
    *,
    method: str = "tlc",
    preset: str = "default",
    config: TLCConfig | None = None,
    test_data: Dataset | None = None,
    collate_fn: Callable | None = None,
    example_inputs: ExampleInputs | None = None,
    out_dir: str | Path | None = None,
    resume: bool = False,
    device: str = "cpu",
    progress: bool = True,
    model_spec: dict[str, Any] | None = None,
    data_spec: str | None = None,
    latency_batch_sizes: Sequence[int] = (1,),
    latency_backends: Sequence[str] = ("eager",),
    log: Callable[[str], None] | None = print,
    **overrides: Any,
) -> CompressionResult:
    """Compress ``model`` (trained, classification) with ``method`` on the given data.

    ``config`` (or ``preset="paper"``) sets the method; keyword ``overrides`` replace single settings
    (``max_acc_drop=0.5``, ``max_steps=3``, ``finetune=FitConfig(...)``, ...). ``test_data``, when
    given, is used only for the final before/after accuracy. ``model_spec``/``data_spec`` are recorded
    so that :func:`tlc.load` can rebuild the model from the output directory.
    """
    if method not in METHODS:
        raise SpecError(f"unknown method {method!r}; available: {', '.join(METHODS)}")
    config = config or (TLCConfig.paper() if preset == "paper" else TLCConfig())
    config = dataclasses.replace(config, **overrides) if overrides else config
    say = log or (lambda _msg: None)
    dev = torch.device(device)
    start = time.perf_counter()
    original = copy.deepcopy(model).to(dev).eval()
    example = to_device(example_inputs if example_inputs is not None else example_batch(val_data, collate_fn), dev)
    calibration = calibration_batches(val_data, config, collate_fn, dev)
    out = Path(out_dir) if out_dir is not None else None
    checkpoints = out / "checkpoints" if out is not None else None
    fingerprint = _fingerprint(config, {"model": model_spec, "data": data_spec, "val": len(val_data),
                                        "train": len(train_data), "params": count_params(original)})

    def run_eval(net: nn.Module, data: Dataset) -> dict[str, float]:
        return evaluate(net, data, collate_fn=collate_fn, batch_size=256, device=dev)

    state, lin = _start(original, example, checkpoints, resume, fingerprint, say)
    start -= state.elapsed_s or sum(h["seconds"] for h in state.history)  # older checkpoints: the steps' time
    if not state.baseline:
        state.baseline = run_eval(original, val_data)
        state.fingerprint = fingerprint
        say(f"original: validation accuracy {100 * state.baseline['accuracy']:.2f}%")
        if checkpoints is not None:
            _save_state(checkpoints, state, None, start)
    floor = state.baseline["accuracy"] - config.max_acc_drop / 100.0
    original_structure = _structure(original, example)

    while not state.stop_reason:
        state.stop_reason = _stop_before_step(state, config, lin, example)
        if state.stop_reason:
            break
        step = state.step + 1
        torch.manual_seed(_derive(config.seed, step))
        graph = trace(lin, example)
        try:
            selection = select(lin, graph, calibration, example, config, progress=progress, exclude=state.set_aside)
        except NoCandidate as reason:
            state.stop_reason = str(reason)
            break
        record, candidate = _run_step(step, "", lin, selection, config, train_data, val_data, collate_fn, dev,
                                      original, example, checkpoints, progress, run_eval, floor, say)
        if not record.within_budget and config.retry_single and len(selection.first_unit().sites) < \
                len(selection.sites) and record.note != "non-finite loss":
            single = selection.first_unit()
            say(f"step {step}: over budget with {len(selection.sites)} sites, retrying with {' + '.join(single.sites)}")
            record, candidate = _run_step(step, "-retry", lin, single, config, train_data, val_data, collate_fn,
                                          dev, original, example, checkpoints, progress, run_eval, floor, say)
        stop = _stop_after_step(record, config, state.history)
        record.accepted = record.within_budget or (config.continue_past_budget and record.note != "non-finite loss")
        state.history.append(asdict(record))
        set_aside = [] if record.accepted or stop else record.sites
        state.set_aside += set_aside
        state.step = step  # a rejected step is recorded too; its weights are not kept
        if record.accepted:
            lin = candidate
            state.record = dict(lin._tlc_record)
            if record.within_budget:
                state.best_step, state.best_record = step, dict(lin._tlc_record)
        state.stop_reason = stop or _stop_on_target(record, config, original_structure)
        if checkpoints is not None:
            _save_state(checkpoints, state, lin, start)
        say(_step_line(record, state.baseline))
        if set_aside:
            say(f"step {step}: {', '.join(set_aside)} set aside; trying the next candidates")

    best = _best_training_form(original, lin, state, example, checkpoints)
    if config.final_finetune_epochs > 0 and state.best_step > 0:
        final = dataclasses.replace(config.finetune, epochs=config.final_finetune_epochs)
        fit(best, train_data, final, collate_fn=collate_fn, device=dev, seed=_derive(config.seed, 10**6),
            teacher=original if config.distill else None, distill=config.distill, progress=progress,
            description="final fine-tune")
    deployed = merge(best, example, policy=config.policy)
    result = _finish(original, original_structure, best, deployed, state, config, example, val_data, test_data,
                     run_eval, latency_batch_sizes, latency_backends, device, start, model_spec, data_spec)
    if out is not None:
        write_outputs(out, result, example)
        check_reload(out, result.model, example, model=None if model_spec else original)
    return result


def _start(original: nn.Module, example: ExampleInputs, checkpoints: Path | None, resume: bool, fingerprint: str,
           say: Callable[[str], None]) -> tuple[_State, nn.Module]:
    if checkpoints is not None and not resume and latest_complete(checkpoints, CHECKPOINT_PREFIX) is not None:
        raise SpecError(f"{checkpoints.parent} already holds a run; pass resume=True (--resume) to continue it, "
                        "or choose another output directory")
    loaded = _load_state(checkpoints, fingerprint) if (resume and checkpoints is not None) else None
    if loaded is None:
        if resume:
            say("nothing to resume: starting a new run")
        return _State(), original
    state, tensors = loaded
    say(f"resuming after step {state.step}")
    if not state.record.get("sites"):
        return state, original
    lin = restore(original, state.record, example)
    lin.load_state_dict(tensors)
    return state, lin.eval()


def _stop_before_step(state: _State, config: TLCConfig, lin: nn.Module, example: ExampleInputs) -> str:
    if config.max_steps is not None and state.step >= config.max_steps:
        return f"max_steps ({config.max_steps}) reached"
    names = [s.name for s in trace(lin, example).sites]
    remaining = len(names)
    if remaining <= config.min_activations:
        return "no activation left to collapse" if remaining == 0 else f"{remaining} activation(s) left"
    if all(n in state.set_aside for n in names):
        return f"no candidate left: the {remaining} remaining activation(s) failed the budget once"
    return ""


def _stop_after_step(record: StepRecord, config: TLCConfig, history: list[dict[str, Any]]) -> str:
    if record.note == "non-finite loss":
        return "non-finite loss during fine-tuning"
    if config.stop_accuracy is not None and record.val_accuracy < config.stop_accuracy:
        return f"validation accuracy below {100 * config.stop_accuracy:.0f}%"
    if not record.within_budget and not config.continue_past_budget:
        in_a_row = 1 + next((i for i, h in enumerate(reversed(history)) if h["accepted"]), len(history))
        if in_a_row >= config.rejection_patience:
            return "accuracy budget spent" + (f" ({in_a_row} rejected steps in a row)" if in_a_row > 1 else "")
    patience = config.budget_patience
    if not record.within_budget and patience is not None:
        recent = [h["within_budget"] for h in history[-(patience - 1):]] if patience > 1 else []
        if len(recent) == patience - 1 and not any(recent):
            return f"{patience} step(s) in a row over the accuracy budget"
    return ""


def _stop_on_target(record: StepRecord, config: TLCConfig, original: dict[str, int]) -> str:
    if not record.accepted:
        return ""
    if config.target_macs_ratio is not None and record.macs <= config.target_macs_ratio * original["macs"]:
        return "target MACs ratio reached"
    if config.target_speedup is not None and record.speedup >= config.target_speedup:
        return "target speed-up reached"
    return ""


def _run_step(step: int, attempt: str, lin: nn.Module, selection: Selection, config: TLCConfig, train_data: Dataset,
              val_data: Dataset, collate_fn: Callable | None, dev: torch.device, original: nn.Module,
              example: ExampleInputs, checkpoints: Path | None, progress: bool,
              run_eval: Callable[[nn.Module, Dataset], dict[str, float]], floor: float,
              say: Callable[[str], None]) -> tuple[StepRecord, nn.Module]:
    began = time.perf_counter()
    whole = f"; whole residual branch off: {', '.join(selection.whole_branches)}" if selection.whole_branches else ""
    say(f"step {step}: collapsing {', '.join(selection.sites)} (joint loss gap {selection.joint_gap:+.4f}{whole})")
    candidate = linearize(lin, selection.sites, example, selection.masks, policy=config.policy).to(dev)
    fit_dir = checkpoints / f"fit_{step:03d}{attempt}" if checkpoints is not None else None
    result = fit(candidate, train_data, config.finetune, collate_fn=collate_fn, device=dev,
                 seed=_derive(config.seed, step), teacher=original if config.distill else None, distill=config.distill,
                 checkpoint_dir=fit_dir, resume=fit_dir is not None, progress=progress,
                 description=f"step {step} fine-tune")
    candidate.eval()
    metrics = run_eval(candidate, val_data)
    deployed = merge(candidate, example, policy=config.policy)
    structure = _structure(deployed, example)
    removed, linearized = _channels(selection)
    finite = result.stopped_reason is None
    record = StepRecord(
        step=step, sites=list(selection.sites), removed_channels=removed, linearized_channels=linearized,
        joint_gap=float(selection.joint_gap), val_accuracy=float(metrics["accuracy"]), val_loss=float(metrics["loss"]),
        within_budget=finite and metrics["accuracy"] >= floor - 1e-12, accepted=False,
        activations=structure["activations"], params=structure["params"], macs=structure["macs"],
        depth=structure["depth"], speedup=_speedup(original, deployed, example, config.latency_repeats, str(dev)),
        finetune_epochs=float(result.epochs), seconds=time.perf_counter() - began,
        note="" if finite else "non-finite loss", whole_branches=selection.whole_branches,
    )
    if fit_dir is not None and fit_dir.is_dir():
        for name in [p.stem.split(".")[0] for p in fit_dir.glob("*.json")]:
            remove_checkpoint(fit_dir, name)
        if not any(fit_dir.iterdir()):
            fit_dir.rmdir()
    return record, candidate


def _best_training_form(original: nn.Module, lin: nn.Module, state: _State, example: ExampleInputs,
                        checkpoints: Path | None) -> nn.Module:
    if state.best_step == 0:
        return original
    last_kept = max((h["step"] for h in state.history if h["accepted"]), default=0)
    if state.best_step == last_kept:  # `lin` is the model of the last kept step
        return lin
    if checkpoints is None:
        raise TLCError("the best step is not the last one and no checkpoints were kept; pass out_dir")
    best = restore(original, state.best_record, example)
    best.load_state_dict(_step_weights(checkpoints, state.best_step))
    return best.eval()


def _step_line(record: StepRecord, baseline: dict[str, Any]) -> str:
    verdict = "kept" if record.accepted else "rejected"
    drop = 100 * (baseline["accuracy"] - record.val_accuracy)
    return (f"step {record.step}: val {100 * record.val_accuracy:.2f}% (drop {drop:+.2f} pt), "
            f"{record.activations} activations, depth {record.depth}, {record.macs / 1e6:.1f}M MACs, "
            f"speed-up x{record.speedup:.2f} [{verdict}]")


# ============================================================================ result and outputs


def _finish(original: nn.Module, original_structure: dict[str, int], best: nn.Module, deployed: nn.Module,
            state: _State, config: TLCConfig, example: ExampleInputs, val_data: Dataset, test_data: Dataset | None,
            run_eval: Callable[[nn.Module, Dataset], dict[str, float]], batch_sizes: Sequence[int],
            backends: Sequence[str], device: str, start: float, model_spec: dict[str, Any] | None,
            data_spec: str | None) -> CompressionResult:
    before = {**original_structure, "val_accuracy": state.baseline["accuracy"]}
    after = {**_structure(deployed, example), "val_accuracy": run_eval(deployed, val_data)["accuracy"]}
    if test_data is not None:
        before["test_accuracy"] = run_eval(original, test_data)["accuracy"]
        after["test_accuracy"] = run_eval(deployed, test_data)["accuracy"]
    comparison = compare(original, deployed, example, batch_sizes=tuple(batch_sizes), backends=tuple(backends),
                         device=device, labels=("original", "compressed"))
    steps = [StepRecord(**h) for h in state.history]
    record = dict(getattr(deployed, "_tlc_record", {}) or {})
    record.update(model=model_spec, data=data_spec)
    deployed._tlc_record = record
    report = {
        "tlc_version": tlc.__version__,
        "method": "tlc", "preset": config.preset, "config": asdict(config),
        "model": model_spec, "data": data_spec, "device": device, "threads": torch.get_num_threads(),
        "original": before, "compressed": after,
        "latency": comparison.to_dict(),
        "steps": [asdict(s) for s in steps],
        "chosen_step": state.best_step, "stop_reason": state.stop_reason,
        "sites_collapsed": record.get("sites", []),
        "finetune_epochs_total": sum(s.finetune_epochs for s in steps)
        + (config.final_finetune_epochs if state.best_step > 0 else 0.0),
        "merge": [asdict(r) for r in deployed.tlc_report.records],
        "network": network_map(original, deployed, example),
        "wall_time_s": time.perf_counter() - start,
    }
    return CompressionResult(deployed, best, before, after, steps, state.stop_reason, state.best_step, report)


def network_map(original: nn.Module, deployed: nn.Module, example: ExampleInputs) -> list[dict[str, Any]]:
    """The original network in execution order (weight layers and activation sites), each with what
    became of it: a site is "kept" or "collapsed"; a layer names the deploy-form layer it went into."""
    from tlc.ops import Kind

    graph = trace(original, rebatch(example, 1))
    collapsed = set((getattr(deployed, "_tlc_record", None) or {}).get("sites", []))
    into: dict[str, str] = {}
    for record in deployed.tlc_report.records:
        for op in record.replaces:
            into[op[op.index("(") + 1:-1]] = record.name
    site_of = {s.node: s.name for s in graph.sites}
    entries = []
    for node in graph.nodes:
        info = graph.info[node]
        if info.kind is Kind.SITE:
            name = site_of[node.name]
            entries.append({"kind": "site", "name": name, "status": "collapsed" if name in collapsed else "kept"})
        elif info.kind in (Kind.CONV, Kind.LINEAR):
            owner = info.owner or node.name
            entries.append({"kind": info.kind.value, "name": owner, "into": into.get(owner, owner)})
    return entries


def write_outputs(out: Path, result: CompressionResult, example: ExampleInputs) -> None:
    """report.json, steps.csv, recipe.json + weights.safetensors (the deploy form) in ``out``."""

    out.mkdir(parents=True, exist_ok=True)
    save(result.model, out, example_inputs=example)
    atomic_write_json(out / "report.json", result.report)
    fields = [f.name for f in dataclasses.fields(StepRecord)]
    lines = [",".join(fields)]
    for s in result.steps:
        row = asdict(s)
        for key in ("sites", "whole_branches"):
            row[key] = " ".join(row[key])
        lines.append(",".join(_csv(row[f]) for f in fields))
    atomic_write_text(out / "steps.csv", "\n".join(lines) + "\n")


def _csv(value: Any) -> str:
    text = f"{value:.6g}" if isinstance(value, float) else str(value)
    return f'"{text}"' if ("," in text or " " in text) else text


def speed_change(row: dict[str, Any]) -> str:
    """``x1.46 faster`` (or ``slower``) from a latency row, flagged when the per-round ratios are too
    spread to tell (their interquartile range holds 1, or spans more than a factor 1.5)."""
    ratio = row["ratio"]
    text = f"x{ratio:.2f} faster" if ratio >= 1 else f"x{1 / ratio:.2f} slower"
    q1, q3 = row.get("ratio_q1"), row.get("ratio_q3")
    if q1 is not None and q3 is not None and (q1 < 1 < q3 or q3 > 1.5 * q1):
        text += f" (noisy: ratios {q1:.2f}-{q3:.2f})"
    return text


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
    for key, label in (("params", "params"), ("macs", "MACs (batch 1)")):
        rows.append((label, si(before[key]), si(after[key]), f"x{before[key] / max(after[key], 1):.2f} smaller"))
    for row in report["latency"]["rows"]:
        rows.append((f"latency {row['backend']} b{row['batch_size']}", f"{row['a_median_ms']:.2f} ms",
                     f"{row['b_median_ms']:.2f} ms", speed_change(row)))
    width = [max(len(r[i]) for r in rows + [("", "original", "compressed", "change")]) for i in range(4)]
    lines = [f"{'':{width[0]}}  {'original':>{width[1]}}  {'compressed':>{width[2]}}  {'change':>{width[3]}}"]
    lines += [f"{a:{width[0]}}  {b:>{width[1]}}  {c:>{width[2]}}  {d:>{width[3]}}" for a, b, c, d in rows]
    lines.append(f"steps: {len(report['steps'])}, chosen: {report['chosen_step']}, stop: {report['stop_reason']}, "
                 f"fine-tuning: {report['finetune_epochs_total']:.1f} epochs, wall time {report['wall_time_s']:.0f} s")
    return "\n".join(lines)


__all__ = ["CompressionResult", "StepRecord", "compress", "example_batch", "format_table", "write_outputs"]
