"""`tlc compress` as one run over several processes (torchrun, gloo on the CPU): one output folder written by
rank 0, the same decisions on every rank and with 1 or 2 processes, a refusal that ends every rank, and
resume after kill -9 of one rank of two: with one process (the same decisions), or (slow) with two (the
same weights, bit for bit). `tlc benchmark` over two processes: one benchmark folder, one refusal line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import tlc

HERE = Path(__file__).parent
ARGS = ["--model", "tlc:tiny_cnn", "--data", "digits", "--train-epochs", "1", "--max-steps", "2",
        "--finetune-epochs", "3", "--calibration-size", "128", "--batch-size", "32", "--max-acc-drop", "100",
        "--quiet", "--seed", "1"]


def _env() -> dict[str, str]:
    source = str(Path(tlc.__file__).parents[1])
    path = os.pathsep.join(filter(None, [source, os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
            "HF_HUB_OFFLINE": "1"}


def _torchrun(processes: int, *command: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
            *command]


def _compress(processes: int, out: Path, *extra: str) -> list[str]:
    cli = ["-m", "tlc.cli", "compress", *ARGS, "--out", str(out), *extra]
    return _torchrun(processes, *cli) if processes > 1 else [sys.executable, *cli]


def _run(command: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """An uninterrupted `tlc compress` over two processes."""
    out = tmp_path_factory.mktemp("two") / "run"
    return out, _run(_compress(2, out))


def test_two_processes_make_one_run_in_one_folder(reference):
    out, done = reference
    assert done.returncode == 0, done.stderr[-3000:]
    assert {"report.json", "steps.csv", "recipe.json", "weights.safetensors", "trained.safetensors"} <= {
        p.name for p in out.iterdir()}
    for line in ("original: validation accuracy", "step 2: val", "outputs in"):  # rank 0 alone prints
        assert done.stdout.count(line) == 1, done.stdout
    report = json.loads((out / "report.json").read_text())
    assert [s["accepted"] for s in report["steps"]] == [True, True] and report["chosen_step"] == 2
    assert report["stop_reason"] == "max_steps (2) reached"
    assert not list((out / "checkpoints").glob("fit_*"))
    deployed = tlc.load(out)
    x = torch.randn(4, 1, 8, 8)
    assert deployed(x).shape == (4, 10)


def test_a_refusal_of_rank_0_ends_every_rank_with_one_line(reference):
    out, _ = reference
    began = time.perf_counter()
    done = _run(_compress(2, out), timeout=120)
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("tlc: error:")]
    assert len(errors) == 1 and "already holds a run" in errors[0], done.stderr[-3000:]
    assert time.perf_counter() - began < 100  # no rank was left waiting for the others


def test_every_rank_and_any_number_of_processes_decide_the_same(tmp_path):
    from .ddp_worker_compress import main as worker_main

    two, one = tmp_path / "two", tmp_path / "one"
    two.mkdir(), one.mkdir()
    done = _run(_torchrun(2, str(HERE / "ddp_worker_compress.py"), str(two)))
    assert done.returncode == 0, done.stderr[-3000:]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)  # as the processes of the torchrun run
        worker_main(one, "tlc")  # one process, no process group
    finally:
        torch.set_num_threads(threads)
    rank0, rank1, single = (json.loads((folder / name).read_text()) for folder, name in
                            ((two, "rank0-of-2.json"), (two, "rank1-of-2.json"), (one, "rank0-of-1.json")))
    assert {k: v for k, v in rank0.items() if k != "rank"} == {k: v for k, v in rank1.items() if k != "rank"}
    assert (two / "run" / "report.json").is_file() and not list(two.glob("run*/rank*"))

    def decisions(record: dict) -> list:
        return [(s["sites"], s["accepted"]) for s in record["steps"]]

    assert decisions(rank0) == decisions(single) and len(decisions(single)) == 3
    assert [rank0[k] for k in ("stop_reason", "chosen_step", "sites_collapsed")] == [
        single[k] for k in ("stop_reason", "chosen_step", "sites_collapsed")]
    assert rank0["steps"][0]["gaps"] == single["steps"][0]["gaps"]  # the same numbers, not only the same order
    assert rank0["batch_split_gaps"] == single["batch_split_gaps"] and len(single["batch_split_gaps"]) == 4


def test_the_latency_policy_is_refused_with_several_processes(monkeypatch):
    from tlc.errors import SpecError
    from tlc.train import distributed

    from .ddp_worker_compress import toy_data, toy_model

    monkeypatch.setattr(distributed, "world_size", lambda: 2)  # refused before any collective
    with pytest.raises(SpecError, match="policy 'latency' runs in one process only"):
        tlc.compress(toy_model(), toy_data(64, 0), toy_data(32, 1), policy="latency", log=None, progress=False)


def test_a_benchmark_over_two_processes_is_one_benchmark_and_refuses_its_own_folder(tmp_path):
    out = tmp_path / "bench"
    command = _torchrun(2, "-m", "tlc.cli", "benchmark", "--model", "tlc:tiny_cnn", "--data", "digits",
                        "--train-epochs", "1", "--methods", "tlc", "--max-steps", "1", "--finetune-epochs", "1",
                        "--calibration-size", "128", "--max-acc-drop", "100", "--threads", "1", "--quiet",
                        "--out", str(out))
    done = _run(command)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("outputs in") == 1, done.stdout  # rank 0 alone prints
    summary = json.loads((out / "benchmark.json").read_text())
    assert [row["label"] for row in summary["rows"]] == ["original", "tlc"]
    assert tlc.load(out / "runs" / "tlc-default")(torch.randn(2, 1, 8, 8)).shape == (2, 10)
    again = _run(command, timeout=120)
    errors = [line for line in again.stderr.splitlines() if line.startswith("tlc: error:")]
    assert again.returncode != 0 and len(errors) == 1 and "already holds a benchmark" in errors[0], \
        again.stderr[-3000:]


def _rank_pid(parent: int, rank: int) -> int | None:
    """The process of `rank` among the children of the torchrun process `parent`."""
    for proc in Path("/proc").iterdir():
        try:
            if not proc.name.isdigit() or int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1]) != parent:
                continue
            if f"RANK={rank}".encode() in (proc / "environ").read_bytes().split(b"\0"):
                return int(proc.name)
        except (OSError, ValueError, IndexError):
            continue
    return None


def _kill_in_step_2(out: Path, rank: int) -> None:
    """Start `tlc compress` over two processes and kill -9 `rank` during the fine-tuning of step 2."""
    victim = subprocess.Popen(_compress(2, out), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True)
    deadline = time.time() + 240
    while not list((out / "checkpoints" / "fit_002").glob("epoch-*.json")):  # inside step 2's fine-tuning
        assert victim.poll() is None, victim.stderr.read()[-3000:]
        assert time.time() < deadline
        time.sleep(0.01)
    os.kill(_rank_pid(victim.pid, rank), signal.SIGKILL)
    assert victim.wait(timeout=120) != 0  # torchrun ends the other rank and the run
    assert not (out / "report.json").exists()


def _killed_then_resumed(tmp_path: Path, rank: int, processes: int) -> tuple[Path, subprocess.CompletedProcess]:
    """A two-process run killed (rank `rank`, kill -9) during step 2, then resumed with `processes`: its folder
    and the resumed run, which must end well after step 1."""
    out = tmp_path / "cut"
    _kill_in_step_2(out, rank=rank)
    resumed = _run(_compress(processes, out, "--resume"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming after step 1" in resumed.stdout
    return out, resumed


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the rank's process through /proc")
def test_kill_one_rank_then_resume_with_one_process(reference, tmp_path):
    out, resumed = _killed_then_resumed(tmp_path, rank=1, processes=1)
    assert "fit_002: begun with another number of processes" in resumed.stdout
    ref = json.loads((reference[0] / "report.json").read_text())
    got = json.loads((out / "report.json").read_text())
    assert [(s["sites"], s["accepted"]) for s in got["steps"]] == [(s["sites"], s["accepted"]) for s in ref["steps"]]
    clock = ("seconds", "speedup", "speedup_q1", "speedup_q3")  # measured on the clock: differ between runs
    assert {k: v for k, v in got["steps"][0].items() if k not in clock} == {
        k: v for k, v in ref["steps"][0].items() if k not in clock}  # step 1 as it was kept
    assert (got["stop_reason"], got["chosen_step"]) == (ref["stop_reason"], ref["chosen_step"])
    assert tlc.load(out)(torch.randn(2, 1, 8, 8)).shape == (2, 10)


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the rank's process through /proc")
def test_kill_rank_0_then_resume_with_as_many_processes_ends_bit_identical(reference, tmp_path):
    out, resumed = _killed_then_resumed(tmp_path, rank=0, processes=2)
    assert "starts over" not in resumed.stdout
    a = load_file(str(reference[0] / "weights.safetensors"))
    b = load_file(str(out / "weights.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
