"""Side-by-side cost of two models: parameters, MACs and interleaved latency, reported as ratios."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from tlc._inputs import ExampleInputs, batch_size_of
from tlc.errors import SpecError
from tlc.measure.count import count_macs, count_params
from tlc.measure.latency import (
    LatencyStats,
    make_runner,
    onnx_model_file,
    physical_cores,
    rebatch,
    time_callable,
    torch_threads,
)


@dataclass
class Comparison:
    """Cost of model a and model b; `ratio` = a / b, i.e. the speed-up of b over a.

    `macs` are for one forward on the example inputs (batch `example_batch_size`). Each row holds
    one (backend, batch size): the median and p10/p90 latency of each model over all timed calls,
    and the median and quartiles of the per-round latency ratios.
    """

    labels: tuple[str, str]
    params: tuple[int, int]
    macs: tuple[int, int]
    example_batch_size: int
    rows: list[dict[str, Any]]
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def params_ratio(self) -> float:
        return self.params[0] / self.params[1]

    @property
    def macs_ratio(self) -> float:
        return self.macs[0] / self.macs[1]

    def to_dict(self) -> dict[str, Any]:
        """JSON-serializable form."""
        return {
            "labels": list(self.labels),
            "params": list(self.params),
            "macs": list(self.macs),
            "example_batch_size": self.example_batch_size,
            "params_ratio": self.params_ratio,
            "macs_ratio": self.macs_ratio,
            "settings": dict(self.settings),
            "rows": [dict(row) for row in self.rows],
        }

    def __str__(self) -> str:
        a, b = self.labels
        width = max(len(a), len(b), len("ratio a/b"))
        lines = [
            f"{'':{width}}  {'params':>10}  {f'MACs (batch {self.example_batch_size})':>18}",
            f"{a:{width}}  {si(self.params[0]):>10}  {si(self.macs[0]):>18}",
            f"{b:{width}}  {si(self.params[1]):>10}  {si(self.macs[1]):>18}",
            f"{'ratio a/b':{width}}  {self.params_ratio:>10.3f}  {self.macs_ratio:>18.3f}",
            "",
            f"{'backend':<12} {'batch':>5} {a + ' ms':>12} {b + ' ms':>12} {'a/b':>7}  {'IQR':<17} rounds",
        ]
        for r in self.rows:
            iqr = f"{r['ratio_q1']:.3f}-{r['ratio_q3']:.3f}"
            lines.append(
                f"{r['backend']:<12} {r['batch_size']:>5} {r['a_median_ms']:>12.3f} "
                f"{r['b_median_ms']:>12.3f} {r['ratio']:>7.3f}  {iqr:<17} {r['rounds']}"
            )
        s = self.settings
        lines.append(f"(device {s.get('device')}, {s.get('threads')} threads, median of "
                     f"{s.get('timed_calls')} calls per model after {s.get('warmup')} warm-up calls)")
        return "\n".join(lines)


def si(n: float) -> str:
    """Number with a k/M/G suffix, three significant digits."""
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{suffix}"
    return f"{n:g}"


def compare(
    model_a: nn.Module,
    model_b: nn.Module,
    example_inputs: ExampleInputs,
    *,
    batch_sizes: Sequence[int] = (1,),
    backends: Sequence[str] = ("eager",),
    warmup: int = 10,
    repeats: int = 30,
    rounds: int = 5,
    device: str | torch.device = "cpu",
    threads: int | None = None,
    channels_last: bool = False,
    labels: tuple[str, str] = ("a", "b"),
) -> Comparison:
    """Parameters, MACs and latency of `model_a` against `model_b` on the same inputs.

    Latency is measured interleaved: after `warmup` calls of each, `rounds` rounds each time a burst
    of ceil(`repeats` / `rounds`) calls of a and of b, alternating which goes first (a b, b a, ...),
    so drift, frequency scaling and background load hit both models alike. The per-round ratio of
    burst medians gives the reported ratio (median) and its spread (quartiles); the defaults give
    5 rounds of 6 calls (bursts much shorter than ~5 calls make the per-round ratio of a
    microsecond-scale model noisy). On the CPU, `threads` defaults to the physical cores
    (:func:`tlc.measure.latency.physical_cores`) and is recorded in ``settings``. channels_last applies
    to the eager backend only; for onnxruntime each model is exported (and verified) once and reused for
    every batch size.
    """
    timing = _Timing(warmup, repeats, rounds, device, threads, channels_last)
    rows, settings = _time_rows({"a": model_a, "b": model_b}, example_inputs, ["a"], batch_sizes, backends, timing)
    return Comparison(
        labels=labels,
        params=(count_params(model_a), count_params(model_b)),
        macs=(count_macs(model_a, example_inputs), count_macs(model_b, example_inputs)),
        example_batch_size=batch_size_of(example_inputs),
        rows=[_pair_row(row) for row in rows],
        settings=settings,
    )


_ROW_STATS = ("median_ms", "p10_ms", "p90_ms")


@dataclass(frozen=True)
class _Session:
    """How one (backend, batch size) row is timed."""

    backend: str
    device: str | torch.device
    threads: int | None
    channels_last: bool
    warmup: int
    rounds: int
    burst: int


def _pair_row(row: dict[str, Any]) -> dict[str, Any]:
    """A comparison row (a_*, b_* statistics, ratio a / b with quartiles) from a line-up row of "a" and "b"."""
    sides = row["models"]
    speed = sides["b"]["speedup"]["a"]  # a's latency over b's, per round
    return {
        "backend": row["backend"],
        "batch_size": row["batch_size"],
        **{f"{k}_{f}": sides[k][f] for k in "ab" for f in _ROW_STATS},
        "ratio": speed["ratio"],
        "ratio_q1": speed["q1"],
        "ratio_q3": speed["q3"],
        "rounds": row["rounds"],
        "timed_calls": row["timed_calls"],
        "threads": row["threads"],
    }


def _interleave(models: list[nn.Module], paths: Sequence[Path | None], inputs: ExampleInputs,
                session: _Session) -> tuple[list[LatencyStats], list[list[float]]]:
    """Time `models` in interleaved rounds: each round a burst of every model, the order rotated and reversed
    from round to round so that drift hits all alike. Returns each model's stats over all its calls and its
    per-round burst medians (the material of per-round ratios)."""
    runners = [
        make_runner(m, inputs, backend=session.backend, device=session.device, threads=session.threads,
                    channels_last=session.channels_last, onnx_path=p)
        for m, p in zip(models, paths)
    ]
    clock, count, burst = runners[0][2], len(models), session.burst
    samples: list[list[float]] = [[] for _ in models]
    medians: list[list[float]] = [[] for _ in models]
    with torch.inference_mode():
        for fn, _, _ in runners:
            time_callable(fn, warmup=session.warmup, repeats=0, device=clock)
        for r in range(session.rounds):
            order = [(i + r // 2) % count for i in range(count)]
            for i in (order if r % 2 == 0 else order[::-1]):
                times = time_callable(runners[i][0], warmup=0, repeats=burst, device=clock)
                samples[i].extend(times)
                medians[i].append(float(np.median(times)))
    conditions = dict(warmup=session.warmup, batch_size=batch_size_of(inputs), backend=session.backend,
                      device=str(torch.device(session.device)), channels_last=session.channels_last)
    stats = [LatencyStats.from_samples(s, threads=t, **conditions) for s, (_, t, _) in zip(samples, runners)]
    return stats, medians


@dataclass
class LineUp:
    """Cost of several models measured in one interleaved session, with speed-ups against references.

    Each row holds one (backend, batch size): per model its median and p10/p90 latency over all timed
    calls and, for every reference model, the median and quartiles of the per-round ratio
    reference / model (the model's speed-up over that reference).
    """

    labels: list[str]
    references: list[str]
    params: dict[str, int]
    macs: dict[str, int]
    example_batch_size: int
    rows: list[dict[str, Any]]
    settings: dict[str, Any] = field(default_factory=dict)

    def speedup(self, label: str, reference: str, backend: str, batch_size: int) -> dict[str, float]:
        """{"ratio", "q1", "q3"} of `label` over `reference` in the (backend, batch size) row."""
        row = next(r for r in self.rows if r["backend"] == backend and r["batch_size"] == batch_size)
        return row["models"][label]["speedup"][reference]

    def to_dict(self) -> dict[str, Any]:
        """JSON-serializable form."""
        return {"labels": list(self.labels), "references": list(self.references), "params": dict(self.params),
                "macs": dict(self.macs), "example_batch_size": self.example_batch_size,
                "settings": dict(self.settings), "rows": [dict(row) for row in self.rows]}


def line_up(
    models: dict[str, nn.Module],
    example_inputs: ExampleInputs,
    *,
    references: Sequence[str],
    batch_sizes: Sequence[int] = (1,),
    backends: Sequence[str] = ("eager",),
    warmup: int = 10,
    repeats: int = 30,
    rounds: int = 5,
    device: str | torch.device = "cpu",
    threads: int | None = None,
    channels_last: bool = False,
    progress: Callable[[str], None] | None = None,
) -> LineUp:
    """Parameters, MACs and latency of every model in `models` (label -> module), all timed in one
    interleaved session per (backend, batch size) as :func:`compare` times two, with each model's
    speed-up over every label in `references`. `progress` is told which row is being timed."""
    missing = [r for r in references if r not in models]
    if missing:
        raise SpecError(f"line_up: unknown reference(s) {missing}")
    timing = _Timing(warmup, repeats, rounds, device, threads, channels_last)
    rows, settings = _time_rows(models, example_inputs, references, batch_sizes, backends, timing, progress)
    return LineUp(labels=list(models), references=list(references),
                  params={k: count_params(m) for k, m in models.items()},
                  macs={k: count_macs(m, rebatch(example_inputs, 1)) for k, m in models.items()},
                  example_batch_size=1, rows=rows, settings=settings)


@dataclass(frozen=True)
class _Timing:
    """How a comparison or a line-up times its models (the arguments they share)."""

    warmup: int
    repeats: int
    rounds: int
    device: str | torch.device
    threads: int | None
    channels_last: bool

    def __post_init__(self) -> None:
        if self.rounds < 1 or self.repeats < 1:
            raise SpecError(f"rounds and repeats must be >= 1, got rounds={self.rounds}, repeats={self.repeats}")


def _time_rows(models: dict[str, nn.Module], example_inputs: ExampleInputs, references: Sequence[str],
               batch_sizes: Sequence[int], backends: Sequence[str], timing: _Timing,
               progress: Callable[[str], None] | None = None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """One interleaved session per (backend, batch size) over `models`: the line-up rows, and the settings
    they were timed with. On the CPU, threads default to the physical cores; channels_last applies to the
    eager backend only; for onnxruntime each model is exported (and verified) once for every batch size."""
    threads = timing.threads
    if threads is None and torch.device(timing.device).type == "cpu":
        threads = physical_cores()
    labels, modules = list(models), list(models.values())
    burst = math.ceil(timing.repeats / timing.rounds)
    rows = []
    with torch_threads(threads) as used_threads, ExitStack() as files:
        for backend in backends:
            paths = [files.enter_context(onnx_model_file(m, example_inputs, backend, None)) for m in modules]
            for batch_size in batch_sizes:
                if progress is not None:
                    progress(f"timing {len(modules)} models: {backend}, batch {batch_size}")
                session = _Session(backend, timing.device, threads, timing.channels_last and backend == "eager",
                                   timing.warmup, timing.rounds, burst)
                stats, medians = _interleave(modules, paths, rebatch(example_inputs, batch_size), session)
                rows.append(_line_up_row(labels, references, stats, medians, backend, batch_size))
    settings = dict(device=str(torch.device(timing.device)), threads=used_threads, warmup=timing.warmup,
                    rounds=timing.rounds, burst=burst, timed_calls=timing.rounds * burst,
                    channels_last=timing.channels_last)
    return rows, settings


def _line_up_row(labels: list[str], references: Sequence[str], stats: list[LatencyStats],
                 medians: list[list[float]], backend: str, batch_size: int) -> dict[str, Any]:
    """One (backend, batch size) row of a line-up."""
    index = {label: i for i, label in enumerate(labels)}
    models = {}
    for i, label in enumerate(labels):
        speedup = {}
        for ref in references:
            ratios = [a / b for a, b in zip(medians[index[ref]], medians[i])]
            q1, median, q3 = np.percentile(ratios, [25, 50, 75])
            speedup[ref] = {"ratio": float(median), "q1": float(q1), "q3": float(q3)}
        models[label] = {**{f: getattr(stats[i], f) for f in _ROW_STATS}, "speedup": speedup}
    return {"backend": backend, "batch_size": batch_size, "threads": stats[0].threads,
            "rounds": len(medians[0]), "timed_calls": stats[0].repeats, "models": models}
