"""Scaling over processes: TLC's ranking and one fine-tuning timed with 1 and with N CPU processes
(torchrun, gloo, one torch thread each), on the digits demo model and on a small Fashion-MNIST ResNet-18.

    python benchmarks/distributed.py [--processes 1 2] [--models digits fashion-mnist]

Each model is trained once in this process (or loaded: runs/bench/distributed/<model>/base.safetensors;
Fashion-MNIST reuses vision.py's ResNet-18 w16 base when it is there), then for each process count a
torchrun of this file (``--worker``) times on rank 0, between barriers:

- ranking: one ``tlc.methods.tlc.select`` on the base model (calibration statistics, every single-site,
  pair and whole-branch loss gap, the joint gaps of the prefixes), the median of ``--repeats``;
- both as wall seconds (the slowest rank, between barriers) and as the CPU seconds of the busiest rank: on a
  machine whose cores other work shares, the CPU seconds say what the wall time is on idle cores;
- fine-tuning: one ``fit`` over ``--train-samples`` training samples (global batch 64), then its validation
  accuracy; with one process it is repeated with a second seed, the spread that a change of the number of
  processes is compared with (docs/usage.md, "Batch size and accuracy").

Every rank must select the same sites; the worker checks it. Results: benchmarks/results/distributed-scaling.json
(with the command line), rendered by benchmarks/results.py.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402
from common import RESULTS, RUNS, machine  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from torch.utils.data import Subset  # noqa: E402

from tlc.graph import trace  # noqa: E402
from tlc.methods.tlc import TLCConfig, select  # noqa: E402
from tlc.run.config import RunConfig  # noqa: E402
from tlc.run.data import calibration_batches  # noqa: E402
from tlc.train import FitConfig, distributed, evaluate, fit, init_from_env  # noqa: E402
from tlc.zoo.data import load_data  # noqa: E402
from tlc.zoo.models import build_model  # noqa: E402

DIRECTORY = RUNS / "distributed"
RESNET_BASE = RUNS / "fashion-mnist-resnet18-w16" / "base.safetensors"


def setup(name: str) -> tuple[Any, Any]:
    """(model, data) of a benchmark model, untrained."""
    torch.manual_seed(0)
    if name == "digits":  # the model and data of `tlc demo`
        data = load_data("digits", seed=0, image_size=16)
        model, _ = build_model("tlc:cifar_mobilenet_v2", num_classes=10, in_channels=1, width_mult=0.5)
    else:
        data = load_data("fashion-mnist", seed=0)
        model, _ = build_model("tlc:cifar_resnet18", num_classes=10, in_channels=1, width=16)
    return model, data


def base_weights(name: str) -> Path:
    """The trained base model's weights (trained here, in one process, when missing)."""
    if name == "fashion-mnist" and RESNET_BASE.is_file():
        return RESNET_BASE
    path = DIRECTORY / name / "base.safetensors"
    if not path.is_file():
        from safetensors.torch import save_file

        model, data = setup(name)
        epochs = 30 if name == "digits" else 2
        fit(model, data.train, FitConfig(epochs=epochs, lr=0.05, batch_size=64, schedule="cosine"),
            collate_fn=data.collate_fn, seed=0, progress=False)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def _timed(fn: Any) -> tuple[dict[str, float], Any]:
    """The wall seconds of ``fn()`` between barriers (the slowest rank's), the CPU seconds of the busiest rank
    (what the wall time would be on idle cores, one per process), and ``fn``'s result."""
    distributed.barrier()
    start, cpu = time.perf_counter(), time.process_time()
    value = fn()
    cpu = time.process_time() - cpu
    distributed.barrier()
    wall = time.perf_counter() - start
    every = distributed.gather_map(lambda mine: [cpu for _ in mine], list(range(distributed.world_size())))
    return {"wall_s": wall, "cpu_s": max(every)}, value


def worker(args: argparse.Namespace) -> None:
    """One torchrun process: time the ranking and the fine-tuning; rank 0 writes the numbers."""
    torch.set_num_threads(1)
    env = init_from_env("cpu")
    model, data = setup(args.model)
    model.load_state_dict(load_file(str(base_weights(args.model))))
    model.eval()
    run = RunConfig(calibration_size=args.calibration_size, calibration_batch_size=64, seed=0)
    calibration = calibration_batches(data.val, run, data.collate_fn, torch.device("cpu"))
    example = data.example_inputs(2)
    graph = trace(model, example)
    ranking, sites = [], []
    for _ in range(args.repeats):
        seconds, selection = _timed(lambda: select(model, graph, calibration, example, TLCConfig()))
        ranking.append(seconds)
        sites.append(selection.sites)
    ranking_median = {k: statistics.median(r[k] for r in ranking) for k in ("wall_s", "cpu_s")}
    chosen = distributed.gather_map(lambda mine: [sites for _ in mine], list(range(env.world_size)))
    if any(other != chosen[0] for other in chosen):
        raise SystemExit(f"ranks selected different sites: {chosen}")
    train = Subset(data.train, range(min(args.train_samples, len(data.train))))
    val = Subset(data.val, range(min(args.val_samples, len(data.val))))
    fits = [finetune(model, args.model, train, val, data.collate_fn, seed)
            for seed in ((0, 1) if env.world_size == 1 else (0,))]
    if env.rank == 0:
        record = {"processes": env.world_size, "ranking": ranking, "ranking_median": ranking_median,
                  "selected": sites[0],
                  "sites": len(graph.sites), "calibration_samples": sum(len(b[1]) for b in calibration),
                  "finetune": fits, "train_samples": len(train), "val_samples": len(val),
                  "load_average": os.getloadavg()}
        Path(args.worker).write_text(json.dumps(record))
    if env.world_size > 1:
        torch.distributed.destroy_process_group()


def finetune(model: Any, name: str, train: Any, val: Any, collate_fn: Any, seed: int) -> dict[str, Any]:
    """Seconds of one fine-tuning of a copy of ``model`` with ``seed``, and its validation accuracy."""
    tuned = setup(name)[0]
    tuned.load_state_dict(model.state_dict())
    config = FitConfig(epochs=1, lr=0.01, batch_size=64, schedule="cosine")
    seconds, _ = _timed(lambda: fit(tuned, train, config, collate_fn=collate_fn, seed=seed, progress=False))
    accuracy = evaluate(tuned, val, collate_fn=collate_fn)["accuracy"]
    return {"seed": seed, **seconds, "val_accuracy": accuracy}


def measure(model: str, processes: int, args: argparse.Namespace) -> dict[str, Any]:
    """Run the worker under torchrun with ``processes`` processes; its record."""
    out = DIRECTORY / model / f"p{processes}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.unlink(missing_ok=True)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
               __file__, "--worker", str(out), "--model", model, "--repeats", str(args.repeats),
               "--train-samples", str(args.train_samples), "--val-samples", str(args.val_samples),
               "--calibration-size", str(args.calibration_size)]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(command, env=environment, check=True)
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["digits", "fashion-mnist"], choices=["digits", "fashion-mnist"])
    parser.add_argument("--processes", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--repeats", type=int, default=3, help="rankings timed per process count (median)")
    parser.add_argument("--train-samples", type=int, default=2048, help="training samples of the fine-tuning")
    parser.add_argument("--val-samples", type=int, default=2000, help="validation samples of the accuracy")
    parser.add_argument("--calibration-size", type=int, default=512)
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # the record file of a torchrun worker
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    rows: dict[str, Any] = {}
    for model in args.models:
        base_weights(model)  # trained once, in one process, before any timing
        rows[model] = {str(n): measure(model, n, args) for n in args.processes}
        print(json.dumps({model: {n: (r["ranking_median"], r["finetune"][0]) for n, r in rows[model].items()}}))
    content = {"name": "distributed-scaling", "machine": {**machine(), "threads": 1},
               "command": "OMP_NUM_THREADS=1 python " + shlex.join(["benchmarks/distributed.py", *sys.argv[1:]]),
               "distributed": rows}
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / "distributed-scaling.json"
    path.write_text(json.dumps(content, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
