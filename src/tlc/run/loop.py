"""The loop every method runs: propose -> apply -> fine-tune -> evaluate, until the accuracy budget is spent.

``tlc.compress(model, train_data, val_data, method=...)`` returns the most compressed model that stays
within the budget, merged into its deploy form and verified, with every step recorded. With ``out_dir``
each step is checkpointed (atomically), so ``resume=True`` continues an interrupted run and ends with
the same result as an uninterrupted one with the same seed. Nothing here knows which method runs: the
method proposes edits (:mod:`tlc.methods.base`); the budget, stopping rules, fine-tuning, merge and
measurement are the same for all.

Under torchrun (a process group joined with :func:`tlc.train.init_from_env`) every rank runs this loop and
reaches the same decisions: fine-tuning is data-parallel, rankings split their candidates over the ranks,
and what is read or written (checkpoints, outputs) or measured on the clock is done by rank 0 and handed
to the others.
"""

from __future__ import annotations

import copy
import dataclasses
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

import tlc
from tlc._inputs import ExampleInputs, logits, to_device
from tlc._inputs import run as run_model
from tlc.edits import Edit, Linearize, apply_edits, edits_from_json, edits_to_json
from tlc.errors import SpecError, TLCError
from tlc.graph import trace
from tlc.io.recipe import check_reload, save, weights_bytes
from tlc.measure import activations, compare, count_macs, count_params, depth
from tlc.measure.count import weight_sparsity
from tlc.measure.latency import rebatch
from tlc.measure.table import LatencyTable
from tlc.methods.base import Method, NoCandidate, Proposal, build_configs, method_class
from tlc.report.tables import format_table, network_map, speed_change
from tlc.run.checks import base_warnings, fine_tuning_gain, near_chance
from tlc.run.config import RunConfig, RunContext
from tlc.run.data import calibration_batches, derive_seed, example_batch
from tlc.run.records import NON_FINITE, StepRecord
from tlc.run.state import CHECKPOINT_PREFIX, RunState, fingerprint, load_state, save_state, step_weights
from tlc.surgery.merge import merge
from tlc.surgery.pricing import using_table
from tlc.train import FitHooks, distributed, evaluate, fit
from tlc.train.checkpoint import (
    atomic_write_json,
    atomic_write_text,
    latest_complete,
    read_state,
    remove_checkpoint,
    remove_checkpoints,
)
from tlc.train.loop import drop_other_world


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
    edits: list[Edit] = field(default_factory=list)

    def __str__(self) -> str:
        return format_table(self.report)


@dataclass
class Outputs:
    """Where and how the result is measured and written."""

    out_dir: Path | None = None
    model_spec: dict[str, Any] | None = None
    data_spec: str | None = None
    test_data: Dataset | None = None
    latency_batch_sizes: Sequence[int] = (1,)
    latency_backends: Sequence[str] = ("eager",)

    @property
    def checkpoints(self) -> Path | None:
        return self.out_dir / "checkpoints" if self.out_dir is not None else None


@dataclass
class _Loop:
    """Everything one run holds, so that its steps are small functions of one object."""

    method: Method
    run: RunContext
    outputs: Outputs
    original: nn.Module  # the trained model as given
    prepared: nn.Module  # after the method's prepare edits: what the step edits apply to
    prepare_edits: list[Edit]
    state: RunState
    start: float
    current: nn.Module | None = None  # the training form of the last kept step
    channels: dict[str, int] = field(default_factory=dict)  # channels of each site of the current model
    floor: float = 0.0
    structure: dict[str, int] = field(default_factory=dict)

    @property
    def config(self) -> RunConfig:
        return self.run.config

    def say(self, message: str) -> None:
        self.run.log(message)

    def evaluate(self, model: nn.Module, data: Dataset) -> dict[str, float]:
        return evaluate(model, data, collate_fn=self.run.collate_fn, batch_size=256, device=self.run.device)

    def rebuild(self, edits: list[dict[str, Any]]) -> nn.Module:
        """The training form a list of (applied) edits gives from the prepared model."""
        model, _ = apply_edits(self.prepared, edits_from_json(edits), self.run.example_inputs)
        return copy.deepcopy(model) if model is self.prepared else model


# ============================================================================ entry point


def compress(
    model: nn.Module,
    train_data: Dataset,
    val_data: Dataset,
    *,
    method: str | type[Method] = "tlc",
    preset: str = "default",
    config: RunConfig | None = None,
    method_config: Any = None,
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
    """Compress ``model`` (trained, classification) with ``method`` (a registered name, ``py:FILE:CLASS``
    or a Method subclass) on the given data.

    ``preset`` picks the method's named settings; ``config`` (shared :class:`RunConfig`) and
    ``method_config`` (the method's Config) replace them; keyword ``overrides`` replace single settings
    of either (``max_acc_drop=0.5``, ``max_steps=3``, ``gap_tolerance=0.1``, ...). ``test_data``, when
    given, is used only for the final before/after accuracy. ``model_spec``/``data_spec`` are recorded
    so that :func:`tlc.load` can rebuild the model from the output directory.

    In a distributed run (every rank calls this with the same arguments) rank 0 alone writes ``out_dir`` and
    logs; the model of rank 0 is the one compressed, and every rank returns the same decisions.
    """
    cls = method if isinstance(method, type) else method_class(method)
    run_config, own = build_configs(cls, preset, overrides, config, method_config)
    _check_processes(run_config)
    dev = torch.device(device)
    main = distributed.is_main_process()
    progress, log = progress and main, log if main else None
    original = distributed.broadcast_state(copy.deepcopy(model).to(dev).eval())
    example = to_device(example_inputs if example_inputs is not None else example_batch(val_data, collate_fn), dev)
    context = RunContext(run_config, example, calibration_batches(val_data, run_config, collate_fn, dev), train_data,
                         val_data, collate_fn, dev, progress, log or (lambda _message: None))
    outputs = Outputs(Path(out_dir) if out_dir is not None else None, model_spec, data_spec, test_data,
                      tuple(latency_batch_sizes), tuple(latency_backends))
    with using_table(_latency_table(run_config, outputs, dev)):
        loop = _open(cls(own), context, outputs, original, resume)
        while not loop.state.stop_reason:
            _step(loop)
        result = _finish(loop)
    if outputs.out_dir is not None:
        distributed.on_main(_write, outputs.out_dir, result, example, None if model_spec else original)
    return result


def _check_processes(config: RunConfig) -> None:
    """What a run over several processes cannot do (refused on every rank alike)."""
    if distributed.world_size() > 1 and config.policy == "latency":
        raise SpecError("policy 'latency' runs in one process only: its latency table is timed on the clock of "
                        "each machine; use --policy macs with several processes")


def _write(out: Path, result: CompressionResult, example: ExampleInputs, original: nn.Module | None) -> None:
    write_outputs(out, result, example)
    check_reload(out, result.model, example, model=original)


def _latency_table(config: RunConfig, outputs: Outputs, device: torch.device) -> LatencyTable | None:
    """Under the latency policy, the table the run's plans read: its first latency backend and batch size,
    on its device and thread count (None for the other policies)."""
    if config.policy != "latency":
        return None
    return LatencyTable(backend=outputs.latency_backends[0], device=device, batch_size=outputs.latency_batch_sizes[0],
                        threads=torch.get_num_threads())


def _settings(method: Method, config: RunConfig) -> dict[str, Any]:
    return {**asdict(config), **asdict(method.config)}


def _open(method: Method, run: RunContext, outputs: Outputs, original: nn.Module, resume: bool) -> _Loop:
    """The loop of a new run, or of the interrupted one in ``outputs.out_dir`` when resuming."""
    start = time.perf_counter()
    checkpoints = outputs.checkpoints
    current = fingerprint(method.name, _settings(method, run.config), {
        "model": outputs.model_spec, "data": outputs.data_spec, "val": len(run.val_data),
        "train": len(run.train_data), "params": count_params(original)})
    if checkpoints is not None and not resume:
        distributed.on_main(_refuse_or_clear, checkpoints)
    defaults = _settings(type(method)(), RunConfig())
    loaded = distributed.on_main(_resumable, checkpoints, current, defaults, run.log) \
        if (resume and checkpoints is not None) else None
    prepared, prepare_edits = apply_edits(original, method.prepare(original, run), run.example_inputs)
    state, tensors = loaded if loaded is not None else (RunState(), None)
    if resume:
        run.log(f"resuming after step {state.step}" if loaded is not None else "nothing to resume: starting a new run")
    loop = _Loop(method, run, outputs, original, prepared.eval(), prepare_edits, state,
                 start - (state.elapsed_s or sum(h["seconds"] for h in state.history)))
    loop.current = loop.rebuild(state.edits)
    if tensors and (state.pretrained or any(h["accepted"] for h in state.history)):  # the last kept weights
        loop.current.load_state_dict(tensors)
    loop.current.eval()
    if not state.baseline:
        state.baseline = loop.evaluate(original, run.val_data)
        state.fingerprint = current
        run.log(f"original: validation accuracy {100 * state.baseline['accuracy']:.2f}%")
        warning = near_chance(state.baseline["accuracy"], _classes(original, run.example_inputs))
        if warning:
            run.log(f"warning: {warning}")
        _pretrain(loop)
        _save(loop, loop.current if state.pretrained else None)
    loop.floor = state.baseline["accuracy"] - run.config.max_acc_drop / 100.0
    loop.structure = _structure(original, run.example_inputs)
    return loop


def _save(loop: _Loop, model: nn.Module | None) -> None:
    """Checkpoint the run's state (rank 0; the others wait)."""
    checkpoints = loop.outputs.checkpoints
    if checkpoints is not None:
        if distributed.is_main_process():
            save_state(checkpoints, loop.state, model, loop.start)
        distributed.barrier()


def _resumable(checkpoints: Path, current: str, defaults: dict[str, Any],
               log: Callable[[str], None]) -> tuple[RunState, dict[str, torch.Tensor]] | None:
    """The state to resume from; the fine-tuning in progress restarts when another number of processes
    began it (its data shares differ)."""
    loaded = load_state(checkpoints, current, defaults)
    for fit_dir in sorted(checkpoints.glob("fit_*")):
        if drop_other_world(fit_dir) is not None:
            log(f"{fit_dir.name}: begun with another number of processes; this fine-tuning starts over")
    return loaded


def _refuse_or_clear(checkpoints: Path) -> None:
    """A new run in a folder: refused where a run made progress (a step, or the training before the first
    one), so nothing is overwritten; what a run that failed before its first step left is cleared, so that
    it does not block the corrected rerun."""
    latest = latest_complete(checkpoints, CHECKPOINT_PREFIX)
    if latest is None:
        return
    progressed = latest != f"{CHECKPOINT_PREFIX}000" or RunState.from_json(read_state(checkpoints, latest)).pretrained
    if progressed:
        raise SpecError(f"{checkpoints.parent} already holds a run; pass resume=True (--resume) to continue it, "
                        "or choose another output directory")
    remove_checkpoint(checkpoints, latest)
    for leftover in checkpoints.glob("fit_*"):
        shutil.rmtree(leftover)


def _pretrain_epochs(loop: _Loop) -> float:
    pretraining = loop.method.pretrain(loop.run) if loop.state.pretrained else None
    return pretraining.epochs if pretraining is not None else 0.0


def _pretrain(loop: _Loop) -> None:
    """The method's training before the first step (with its hooks), on the prepared model."""
    config = loop.method.pretrain(loop.run)
    if config is None:
        return
    run, checkpoints = loop.run, loop.outputs.checkpoints
    fit_dir = checkpoints / "fit_000" if checkpoints is not None else None
    loop.say(f"training before the first step ({config.epochs:g} epochs, with {loop.method.name}'s hooks)")
    result = fit(loop.current, run.train_data, config, collate_fn=run.collate_fn, device=run.device,
                 seed=derive_seed(loop.config.seed, 0), checkpoint_dir=fit_dir, resume=fit_dir is not None,
                 progress=run.progress, description="training", hooks=_hooks(loop.method))
    if result.stopped_reason is not None:
        raise TLCError(f"training before the first step stopped: {result.stopped_reason}")
    loop.current.eval()
    loop.state.pretrained = True
    _remove_fit_checkpoints(fit_dir)


# ============================================================================ one step


def _step(loop: _Loop) -> None:
    """Propose, apply, fine-tune and judge one step; record it and checkpoint."""
    state, config = loop.state, loop.config
    lin: nn.Module = loop.current
    state.stop_reason = _stop_before_step(state, config, lin, loop.run.example_inputs)
    if state.stop_reason:
        return
    step = state.step + 1
    torch.manual_seed(derive_seed(config.seed, step))
    graph = trace(lin, loop.run.example_inputs)
    try:
        proposal = loop.method.propose(lin, graph, loop.run, list(state.set_aside))
    except NoCandidate as reason:
        state.stop_reason = str(reason)
        return
    loop.channels = {s.name: s.channels for s in graph.sites}
    record, candidate, applied = _try(loop, step, "", lin, proposal)
    fallback = proposal.fallback
    if not record.within_budget and config.retry_single and fallback is not None and record.note != NON_FINITE:
        loop.say(f"step {step}: over budget, retrying with {fallback.label or 'the fallback'}")
        record, candidate, applied = _try(loop, step, "-retry", lin, fallback)
    stop = _stop_after_step(record, config, state.history)
    record.accepted = record.within_budget or (config.continue_past_budget and record.note != NON_FINITE)
    state.history.append(asdict(record))
    warning = fine_tuning_gain(state.baseline["accuracy"], state.history, config.max_acc_drop) if step == 1 else ""
    if warning:
        loop.say(f"warning: {warning}")
    set_aside = [] if record.accepted or stop else record.sites
    state.set_aside += set_aside
    state.step = step  # a rejected step is recorded too; its weights are not kept
    if record.accepted:
        loop.current = candidate
        state.edits = state.edits + edits_to_json(applied)
        if record.within_budget:
            state.best_step, state.best_edits = step, list(state.edits)
    state.stop_reason = stop or _stop_on_target(record, config, loop.structure)
    _save(loop, loop.current)
    loop.say(_step_line(record, state.baseline))
    if set_aside:
        loop.say(f"step {step}: {', '.join(set_aside)} set aside; trying the next candidates")


def _try(loop: _Loop, step: int, attempt: str, lin: nn.Module,
         proposal: Proposal) -> tuple[StepRecord, nn.Module, list[Edit]]:
    """Apply ``proposal`` to ``lin``, fine-tune, evaluate and measure: the step's record."""
    began = time.perf_counter()
    run, config = loop.run, loop.config
    loop.say(f"step {step}: {proposal.label or ', '.join(proposal.sites)}")
    candidate, applied = apply_edits(lin, proposal.edits, run.example_inputs)
    if candidate is lin:  # no edit built a new model: fine-tune a copy, so that a rejected step leaves `lin` as it was
        candidate = copy.deepcopy(lin)
    candidate = candidate.to(run.device)
    checkpoints = loop.outputs.checkpoints
    fit_dir = checkpoints / f"fit_{step:03d}{attempt}" if checkpoints is not None and proposal.finetune else None
    result = fit(candidate, run.train_data, config.finetune, collate_fn=run.collate_fn, device=run.device,
                 seed=derive_seed(config.seed, step), teacher=loop.original if config.distill else None,
                 distill=config.distill, checkpoint_dir=fit_dir, resume=fit_dir is not None, progress=run.progress,
                 description=f"step {step} fine-tune", hooks=_hooks(loop.method)) if proposal.finetune else None
    candidate.eval()
    metrics = loop.evaluate(candidate, run.val_data)
    deployed = merge(candidate, run.example_inputs, policy=config.policy)
    structure = _structure(deployed, run.example_inputs)
    removed, linearized = _channels(applied, loop.channels)
    speed = distributed.on_main(_speedup, loop.original, deployed, run, config.latency_repeats)  # rank 0's clock
    finite = result is None or result.stopped_reason is None
    evidence = proposal.evidence
    record = StepRecord(
        step=step, sites=proposal.sites, removed_channels=removed, linearized_channels=linearized,
        joint_gap=evidence.get("joint_gap"), val_accuracy=float(metrics["accuracy"]),
        val_loss=float(metrics["loss"]), within_budget=finite and metrics["accuracy"] >= loop.floor - 1e-12,
        accepted=False, activations=structure["activations"], params=structure["params"], macs=structure["macs"],
        depth=structure["depth"], speedup=speed["ratio"], speedup_q1=speed["ratio_q1"], speedup_q3=speed["ratio_q3"],
        finetune_epochs=float(result.epochs) if result is not None else 0.0, seconds=time.perf_counter() - began,
        note="" if finite else NON_FINITE, whole_branches=list(evidence.get("whole_branches", [])),
        evidence=evidence,
    )
    _remove_fit_checkpoints(fit_dir)
    return record, candidate, applied


def _hooks(method: Method) -> FitHooks | None:
    return FitHooks(loss=method.loss, after_step=method.after_step, param_lr=method.param_lr) \
        if method.has_fit_hooks() else None


def _remove_fit_checkpoints(fit_dir: Path | None) -> None:
    if fit_dir is not None and distributed.is_main_process():
        remove_checkpoints(fit_dir)


def _channels(edits: Sequence[Edit], site_channels: dict[str, int]) -> tuple[int, int]:
    """(removed, linearized) channels of the sites the edits linearize (no mask: all linearized)."""
    removed = linearized = 0
    for edit in edits:
        if isinstance(edit, Linearize):
            for name in edit.site_names:
                mask = edit.masks.get(name)
                off = 0 if mask is None else mask.count(0)
                removed += off
                linearized += (site_channels.get(name, 0) if mask is None else len(mask)) - off
    return removed, linearized


def _classes(model: nn.Module, example: ExampleInputs) -> int:
    """Classes the model tells apart (the width of its logits)."""
    with torch.no_grad():
        return int(logits(run_model(model, example)).shape[-1])


def _structure(model: nn.Module, example: ExampleInputs) -> dict[str, int]:
    one = rebatch(example, 1)
    return {"params": count_params(model, unique=False), "unique_params": count_params(model),
            "macs": count_macs(model, one), "depth": depth(model, one), "activations": activations(model, one),
            "weight_sparsity": weight_sparsity(model)}


def _speedup(original: nn.Module, deployed: nn.Module, run: RunContext, repeats: int) -> dict[str, Any]:
    """The quick batch-1 latency row of a step (ratio original / deployed, with its quartiles)."""
    cmp = compare(original, deployed, run.example_inputs, batch_sizes=(1,), repeats=repeats, warmup=3, rounds=5,
                  device=str(run.device))
    return cmp.rows[0]


# ============================================================================ stopping rules


def _stop_before_step(state: RunState, config: RunConfig, lin: nn.Module, example: ExampleInputs) -> str:
    if config.max_steps is not None and state.step >= config.max_steps:
        return f"max_steps ({config.max_steps}) reached"
    names = [s.name for s in trace(lin, example).sites]
    remaining = len(names)
    if remaining <= config.min_activations:
        return "no activation left to collapse" if remaining == 0 else f"{remaining} activation(s) left"
    if all(n in state.set_aside for n in names):
        return f"no candidate left: the {remaining} remaining activation(s) failed the budget once"
    return ""


def _stop_after_step(record: StepRecord, config: RunConfig, history: list[dict[str, Any]]) -> str:
    if record.note == NON_FINITE:
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


def _stop_on_target(record: StepRecord, config: RunConfig, original: dict[str, int]) -> str:
    if not record.accepted:
        return ""
    if config.target_macs_ratio is not None and record.macs <= config.target_macs_ratio * original["macs"]:
        return "target MACs ratio reached"
    if config.target_speedup is not None and record.speedup >= config.target_speedup:
        return "target speed-up reached"
    return ""


def _step_line(record: StepRecord, baseline: dict[str, Any]) -> str:
    verdict = "kept" if record.accepted else "rejected"
    drop = 100 * (baseline["accuracy"] - record.val_accuracy)
    return (f"step {record.step}: val {100 * record.val_accuracy:.2f}% (drop {drop:+.2f} pt), "
            f"{record.activations} activations, depth {record.depth}, {record.macs / 1e6:.1f}M MACs, "
            f"{speed_change({'ratio': record.speedup, 'ratio_q1': record.speedup_q1, 'ratio_q3': record.speedup_q3})} "
            f"[{verdict}]")


# ============================================================================ result and outputs


def _best_training_form(loop: _Loop) -> tuple[nn.Module, list[dict[str, Any]]]:
    """The training form of the best step within the budget (one step at least)."""
    state = loop.state
    last_kept = max((h["step"] for h in state.history if h["accepted"]), default=0)
    if state.best_step == last_kept:  # the current model is that of the last kept step
        return loop.current, state.edits
    checkpoints = loop.outputs.checkpoints
    if checkpoints is None:
        raise TLCError("the best step is not the last one and no checkpoints were kept; pass out_dir")
    best = loop.rebuild(state.best_edits)
    best.load_state_dict(distributed.on_main(step_weights, checkpoints, state.best_step))
    return best.eval(), state.best_edits


def _finish(loop: _Loop) -> CompressionResult:
    """Finalize, fine-tune and merge the best model; measure it against the original. When no step stayed
    within the budget the result is the original as given: a method's preparation (a learnable activation
    at its initial value) may already change what the network computes, and is not kept either."""
    run, config, state = loop.run, loop.config, loop.state
    if state.best_step == 0:
        original = copy.deepcopy(loop.original).eval()
        deployed = merge(original, run.example_inputs, policy=config.policy)
        return CompressionResult(deployed, original, *_report(loop, deployed, []), edits=[])
    best, best_edits = _best_training_form(loop)
    best, final_edits = apply_edits(best, loop.method.finalize(best, run), run.example_inputs)
    if config.final_finetune_epochs > 0:
        final = dataclasses.replace(config.finetune, epochs=config.final_finetune_epochs)
        fit(best, run.train_data, final, collate_fn=run.collate_fn, device=run.device,
            seed=derive_seed(config.seed, 10**6), teacher=loop.original if config.distill else None,
            distill=config.distill, progress=run.progress, description="final fine-tune", hooks=_hooks(loop.method))
        best.eval()
    edits = loop.prepare_edits + edits_from_json(best_edits) + final_edits
    deployed = merge(best, run.example_inputs, policy=config.policy)
    return CompressionResult(deployed, best, *_report(loop, deployed, edits), edits=edits)


def _report(loop: _Loop, deployed: nn.Module, edits: list[Edit]) -> tuple:
    run, config, state, outputs = loop.run, loop.config, loop.state, loop.outputs
    before = {**loop.structure, "weights_bytes": weights_bytes(loop.original),
              "val_accuracy": state.baseline["accuracy"]}
    after = {**_structure(deployed, run.example_inputs), "weights_bytes": weights_bytes(deployed),
             "val_accuracy": loop.evaluate(deployed, run.val_data)["accuracy"]}
    if outputs.test_data is not None:
        before["test_accuracy"] = loop.evaluate(loop.original, outputs.test_data)["accuracy"]
        after["test_accuracy"] = loop.evaluate(deployed, outputs.test_data)["accuracy"]
    latency = distributed.on_main(_compare, loop.original, deployed, run, outputs)  # rank 0's clock
    steps = [StepRecord(**h) for h in state.history]
    report = {
        "tlc_version": tlc.__version__,
        "method": loop.method.name, "preset": config.preset,
        "config": {**asdict(config), **asdict(loop.method.config)},
        "model": outputs.model_spec, "data": outputs.data_spec, "device": str(run.device),
        "threads": torch.get_num_threads(),
        "original": before, "compressed": after,
        "latency": latency,
        "steps": [asdict(s) for s in steps],
        "chosen_step": state.best_step, "stop_reason": state.stop_reason,
        "sites_collapsed": [s for e in edits for s in e.sites],
        "edits": edits_to_json(edits),
        "finetune_epochs_total": sum(s.finetune_epochs for s in steps)
        + (config.final_finetune_epochs if state.best_step > 0 else 0.0) + _pretrain_epochs(loop),
        "merge": [asdict(r) for r in deployed.tlc_report.records],
        "merge_clock": deployed.tlc_report.clock,
        "network": network_map(loop.original, deployed, run.example_inputs, [s for e in edits for s in e.sites]),
        "wall_time_s": time.perf_counter() - loop.start,
        "warnings": base_warnings(state.baseline["accuracy"], _classes(loop.original, run.example_inputs),
                                  state.history, config.max_acc_drop),
    }
    return before, after, steps, state.stop_reason, state.best_step, report


def _compare(original: nn.Module, deployed: nn.Module, run: RunContext, outputs: Outputs) -> dict[str, Any]:
    return compare(original, deployed, run.example_inputs, batch_sizes=tuple(outputs.latency_batch_sizes),
                   backends=tuple(outputs.latency_backends), device=str(run.device),
                   labels=("original", "compressed")).to_dict()


def write_outputs(out: Path, result: CompressionResult, example: ExampleInputs) -> None:
    """report.json, steps.csv, recipe.json + weights.safetensors (the deploy form) in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    save(result.model, out, example_inputs=example, edits=result.edits, model_spec=result.report.get("model"))
    atomic_write_json(out / "report.json", result.report)
    names = [f.name for f in dataclasses.fields(StepRecord) if f.name != "evidence"]
    lines = [",".join(names)]
    for s in result.steps:
        row = asdict(s)
        for key in ("sites", "whole_branches"):
            row[key] = " ".join(row[key])
        lines.append(",".join(_csv(row[f]) for f in names))
    atomic_write_text(out / "steps.csv", "\n".join(lines) + "\n")


def _csv(value: Any) -> str:
    text = f"{value:.6g}" if isinstance(value, float) else str(value)
    return f'"{text}"' if ("," in text or " " in text) else text


__all__ = ["CompressionResult", "Outputs", "StepRecord", "compress", "write_outputs"]
