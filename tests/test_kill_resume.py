"""kill -9 in the middle of `tlc compress`, then --resume: the final result equals an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

ARGS = ["--model", "tlc:cifar_mobilenet_v2", "--data", "digits", "--train-epochs", "2", "--max-steps", "3",
        "--finetune-epochs", "0.5", "--calibration-size", "64", "--max-acc-drop", "100", "--batch-size", "32",
        "--quiet", "--seed", "3"]


def _run(out: Path, *extra: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1")
    return subprocess.Popen([sys.executable, "-m", "tlc.cli", "compress", *ARGS, "--out", str(out), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)


@pytest.mark.slow
def test_kill_minus_9_then_resume(tmp_path):
    reference = _run(tmp_path / "ref")
    assert reference.wait(timeout=1200) == 0, reference.stdout.read()
    victim = _run(tmp_path / "cut")
    checkpoint = tmp_path / "cut" / "checkpoints" / "step_001.json"
    deadline = time.time() + 1200
    while not checkpoint.exists():
        assert victim.poll() is None, "the run ended before it could be interrupted"
        assert time.time() < deadline
        time.sleep(0.2)
    time.sleep(1.0)  # inside step 2
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    resumed = _run(tmp_path / "cut", "--resume")
    output = resumed.communicate(timeout=1200)[0]
    assert resumed.returncode == 0, output
    assert "resuming after step 1" in output
    ref = json.loads((tmp_path / "ref" / "report.json").read_text())
    got = json.loads((tmp_path / "cut" / "report.json").read_text())
    assert [s["sites"] for s in got["steps"]] == [s["sites"] for s in ref["steps"]]
    assert got["compressed"]["val_accuracy"] == ref["compressed"]["val_accuracy"]
    a = load_file(str(tmp_path / "ref" / "weights.safetensors"))
    b = load_file(str(tmp_path / "cut" / "weights.safetensors"))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
