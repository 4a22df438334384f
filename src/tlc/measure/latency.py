"""Wall-clock latency: median of repeated calls after warm-up, in eager PyTorch or onnxruntime."""

from __future__ import annotations

import copy
import gc
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn
from torch.utils._pytree import tree_map

from tlc._inputs import ExampleInputs, as_call, batch_size_of, to_device
from tlc.errors import SpecError

Backend = Literal["eager", "onnxruntime"]
BACKENDS: tuple[str, ...] = ("eager", "onnxruntime")


@dataclass(frozen=True)
class LatencyStats:
    """Summary of repeated timings of one model call, with the conditions it was measured under."""

    median_ms: float
    p10_ms: float
    p90_ms: float
    mean_ms: float
    std_ms: float
    repeats: int
    warmup: int
    batch_size: int
    backend: str
    device: str
    threads: int
    channels_last: bool

    @classmethod
    def from_samples(cls, samples_ms: Sequence[float], **conditions: Any) -> LatencyStats:
        """Summarise per-call timings; `conditions` are the remaining (non-statistic) fields."""
        a = np.asarray(samples_ms, dtype=float)
        p10, median, p90 = np.percentile(a, [10, 50, 90])
        return cls(
            median_ms=float(median),
            p10_ms=float(p10),
            p90_ms=float(p90),
            mean_ms=float(a.mean()),
            std_ms=float(a.std()),
            repeats=len(a),
            **conditions,
        )

    @property
    def per_sample_ms(self) -> float:
        """Median latency divided by the batch size."""
        return self.median_ms / self.batch_size

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form (JSON-serializable)."""
        return asdict(self)


def time_callable(
    fn: Callable[[], Any], *, warmup: int, repeats: int, device: str | torch.device
) -> list[float]:
    """Milliseconds taken by each of `repeats` calls of `fn`, after `warmup` untimed calls.

    On a CUDA device each call is bracketed by CUDA events (the GPU's own clock, so asynchronous
    launches are timed to completion); elsewhere by `time.perf_counter`. The garbage collector is
    paused while timing so that a collection does not land in one sample (`gc.collect()` is not
    called here: with a large heap it takes ~0.1 s, too much to pay per burst).
    """
    dev = torch.device(device)
    if dev.type == "cuda":
        _check_cuda()
        return _time_cuda(fn, warmup, repeats, dev)
    for _ in range(warmup):
        fn()
    samples = []
    with _gc_paused():
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - start) * 1e3)
    return samples


def _time_cuda(fn: Callable[[], Any], warmup: int, repeats: int, dev: torch.device) -> list[float]:
    """Per-call milliseconds measured with CUDA events on the current stream of `dev`."""
    with torch.cuda.device(dev):
        for _ in range(warmup):
            fn()
        events = [_event_pair() for _ in range(repeats)]
        torch.cuda.synchronize(dev)
        with _gc_paused():
            for start, end in events:
                start.record()
                fn()
                end.record()
            torch.cuda.synchronize(dev)
    return [start.elapsed_time(end) for start, end in events]


def _event_pair() -> tuple[torch.cuda.Event, torch.cuda.Event]:
    return torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)


def _check_cuda() -> None:
    if not torch.cuda.is_available():
        raise SpecError("a CUDA device was requested but torch.cuda.is_available() is False")


@contextmanager
def _gc_paused() -> Iterator[None]:
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def rebatch(example_inputs: ExampleInputs, batch_size: int) -> ExampleInputs:
    """The example inputs with every tensor cut or tiled along dim 0 to `batch_size` rows."""
    if batch_size < 1:
        raise SpecError(f"batch_size must be >= 1, got {batch_size}")

    def resize(t: Any) -> Any:
        if not isinstance(t, torch.Tensor) or t.dim() == 0:
            return t
        reps = math.ceil(batch_size / t.shape[0])
        return t.repeat(reps, *([1] * (t.dim() - 1)))[:batch_size]

    return tree_map(resize, example_inputs)


def measure_latency(
    model: nn.Module,
    example_inputs: ExampleInputs,
    *,
    batch_size: int | None = None,
    backend: Backend = "eager",
    warmup: int = 10,
    repeats: int = 50,
    device: str | torch.device = "cpu",
    threads: int | None = None,
    channels_last: bool = False,
    onnx_path: str | Path | None = None,
) -> LatencyStats:
    """Latency of one forward of `model` on `example_inputs` (re-batched to `batch_size` if given).

    eager: an eval-mode model (copied when it has to be changed: moved, switched to eval or to
    channels_last) under `torch.inference_mode()`. onnxruntime: the model exported and verified
    with `tlc.io.export.export_onnx` (or the file `onnx_path`), run with `threads` intra-op threads.
    `threads` defaults to `torch.get_num_threads()`; the count actually used is recorded.
    """
    check_backend(backend, channels_last)
    inputs = example_inputs if batch_size is None else rebatch(example_inputs, batch_size)
    conditions = dict(
        warmup=warmup, batch_size=batch_size_of(inputs), backend=backend, device=str(torch.device(device)),
        channels_last=channels_last,
    )
    with torch_threads(threads), onnx_model_file(model, example_inputs, backend, onnx_path) as path:
        fn, used_threads, timing_device = make_runner(
            model, inputs, backend=backend, device=device, threads=threads, channels_last=channels_last,
            onnx_path=path,
        )
        with torch.inference_mode():
            samples = time_callable(fn, warmup=warmup, repeats=repeats, device=timing_device)
    return LatencyStats.from_samples(samples, threads=used_threads, **conditions)


def physical_cores() -> int:
    """Physical CPU cores this process may use: the default thread count of latency measurements
    (hyper-threads share a core's arithmetic units, so timings at the logical count are noisier)."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return max(usable, 1)
    cores, physical = set(), "0"
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "physical id":
            physical = value.strip()
        elif key.strip() == "core id":
            cores.add((physical, value.strip()))
    return max(min(len(cores) or usable, usable), 1)


@contextmanager
def torch_threads(threads: int | None) -> Iterator[int]:
    """Run with `threads` intra-op PyTorch threads (unchanged if None); yields the count in force."""
    before = torch.get_num_threads()
    if threads is not None:
        if threads < 1:
            raise SpecError(f"threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


@contextmanager
def onnx_model_file(
    model: nn.Module, example_inputs: ExampleInputs, backend: str, onnx_path: str | Path | None
) -> Iterator[Path | None]:
    """The ONNX file `backend` runs: None for eager, else `onnx_path` or a verified export in a temp dir."""
    if backend != "onnxruntime" or onnx_path is not None:
        yield None if onnx_path is None else Path(onnx_path)
        return
    from tlc.io.export import export_onnx

    with tempfile.TemporaryDirectory(prefix="tlc-onnx-") as tmp:
        yield export_onnx(model, example_inputs, Path(tmp) / "model.onnx")


def make_runner(
    model: nn.Module,
    inputs: ExampleInputs,
    *,
    backend: str,
    device: str | torch.device,
    threads: int | None,
    channels_last: bool,
    onnx_path: Path | None,
) -> tuple[Callable[[], Any], int, str]:
    """A no-argument callable running one forward, the thread count it uses, and the clock to time it by.

    onnxruntime is timed with the host clock even on a GPU: `run` returns host arrays, so its
    duration already includes the device work and the copies.
    """
    check_backend(backend, channels_last)
    if backend == "eager":
        return _eager_runner(model, inputs, device, channels_last), torch.get_num_threads(), str(device)
    if onnx_path is None:
        raise SpecError("the onnxruntime backend needs an ONNX file")
    fn, used = _onnxruntime_runner(onnx_path, inputs, device, threads)
    return fn, used, "cpu"


def check_backend(backend: str, channels_last: bool) -> None:
    """Refuse an unknown backend, or channels_last where it has no meaning."""
    if backend not in BACKENDS:
        raise SpecError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    if channels_last and backend != "eager":
        raise SpecError("channels_last applies to the eager backend only (ONNX graphs are NCHW)")


def _eager_runner(
    model: nn.Module, inputs: ExampleInputs, device: str | torch.device, channels_last: bool
) -> Callable[[], Any]:
    """Call of an eval-mode copy of `model` (on `device`, optionally channels_last) on prepared inputs."""
    dev = torch.device(device)
    if dev.type == "cuda":
        _check_cuda()
    ready = _deployable(model, dev, channels_last)
    inputs = to_device(inputs, dev)
    if channels_last:
        inputs = tree_map(_to_channels_last, inputs)
    args, kwargs = as_call(inputs)
    return lambda: ready(*args, **kwargs)


def _deployable(model: nn.Module, dev: torch.device, channels_last: bool) -> nn.Module:
    """`model` itself if it is already in eval mode on `dev`, else a converted copy."""
    on_device = all(_same_device(t.device, dev) for t in [*model.parameters(), *model.buffers()])
    training = any(m.training for m in model.modules())
    if on_device and not training and not channels_last:
        return model
    ready = copy.deepcopy(model).to(dev).eval()
    return ready.to(memory_format=torch.channels_last) if channels_last else ready


def _same_device(a: torch.device, b: torch.device) -> bool:
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


def _to_channels_last(t: Any) -> Any:
    if isinstance(t, torch.Tensor) and t.dim() == 4:
        return t.contiguous(memory_format=torch.channels_last)
    return t


def _onnxruntime_runner(
    path: Path, inputs: ExampleInputs, device: str | torch.device, threads: int | None
) -> tuple[Callable[[], Any], int]:
    """Call of an onnxruntime session on `path` with numpy inputs, and its intra-op thread count. Its idle
    threads do not spin: models timed in turn (interleaved) would otherwise run beside the spinning pool of
    the one before (measured on a 2-core CPU: per-round ratios of a model against itself spread 0.84-1.77
    with spinning, 0.98-1.04 without)."""
    from tlc.io.export import onnxruntime_session, session_feed

    session = onnxruntime_session(path, device=device, threads=threads or torch.get_num_threads(), spinning=False)
    feed = session_feed(session, inputs)
    used = session.get_session_options().intra_op_num_threads
    return lambda: session.run(None, feed), used

