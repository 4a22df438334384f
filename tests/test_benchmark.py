"""``tlc.benchmark`` / ``tlc benchmark``: every method on one toy model, side by side, resumable."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import tlc
from tlc.cli import main
from tlc.errors import SpecError, TLCError
from tlc.measure.compare import line_up
from tlc.run import benchmark as bench
from tlc.run.benchmark import Timing, parse_entries
from tlc.train import FitConfig

from .helpers import digit_subsets, trained_briefly

METHODS = ["tlc", "easier", "layer_collapse"]
SHARED = dict(finetune=FitConfig(epochs=0.25, lr=0.01, batch_size=32), calibration_size=32, calibration_batch_size=32,
              max_steps=1, latency_repeats=2, max_acc_drop=100.0)
TIMING = Timing(batch_size=4, backends=("eager",), repeats=4, rounds=2, threads=1)


class SmallNet(nn.Module):
    """conv-bn-relu, one residual block, pooled, an MLP head (so every method has something to act on)."""

    def __init__(self, width: int = 4):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
                                   nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width))
        self.head = nn.Sequential(nn.Linear(width, 16), nn.ReLU(), nn.Linear(16, 10))

    def forward(self, x):
        x = self.stem(x)
        x = torch.relu(x + self.block(x))
        return self.head(x.mean((2, 3)))


@pytest.fixture(scope="module")
def digits():
    return digit_subsets(96, 48)


@pytest.fixture(scope="module")
def trained(digits):
    torch.manual_seed(0)
    return trained_briefly(SmallNet(), digits[1], epochs=3)


def _run(trained, digits, out, **kwargs):
    data, train, val = digits
    options = dict(methods=METHODS, timing=TIMING, example_inputs=data.example_inputs(2), progress=False, log=None,
                   **SHARED)
    return tlc.benchmark(trained, train, val, out_dir=out, **{**options, **kwargs})


def test_three_methods_side_by_side_table_json_plot_and_loadable_results(trained, digits, tmp_path):
    result = _run(trained, digits, tmp_path)
    labels = [r["label"] for r in result.rows]
    assert labels == ["original", *METHODS]
    summary = json.loads((tmp_path / "benchmark.json").read_text())
    assert summary["format"] == "tlc-benchmark" and summary["rows"] == json.loads(json.dumps(result.rows))
    assert summary["settings"]["methods"] == METHODS and summary["timing"]["threads"] == 1
    assert [(r["backend"], r["batch_size"]) for r in summary["lineup"]["rows"]] == [("eager", 1), ("eager", 4)]
    for row in result.rows:
        assert row["status"] == "done", row
        for key in ("val_accuracy", "depth", "activations", "params", "unique_params", "macs", "weights_bytes"):
            assert row[key] is not None, (row["label"], key)
        for measured in row["latency"].values():
            assert set(measured["speedup"]) == {"original", "bn-folded"} and measured["median_ms"] > 0
            assert measured["speedup"]["original"]["q1"] <= measured["speedup"]["original"]["ratio"] \
                <= measured["speedup"]["original"]["q3"]
    assert result.rows[0]["latency"]["eager@1"]["speedup"]["original"]["ratio"] == 1.0
    assert result.rows[0]["val_accuracy"] == pytest.approx(
        tlc.train.evaluate(trained, digits[2])["accuracy"])
    for row in result.rows[1:]:  # each method's folder is a normal result: it loads and computes what was timed
        assert row["finetune_epochs"] >= 0 and row["wall_time_s"] > 0
        loaded = tlc.load(tmp_path / row["folder"], model=SmallNet())
        x = digits[0].example_inputs(3)
        torch.testing.assert_close(loaded(x), result.models[row["label"]](x), rtol=1e-5, atol=1e-5)
    text = str(result)
    assert all(label in text for label in labels) and "speed-up eager@1" in text
    png = tmp_path / "pareto.png"
    assert png.stat().st_size > 10_000 and png.read_bytes()[:4] == b"\x89PNG"


def test_a_benchmark_killed_between_methods_resumes_without_rerunning_the_finished_ones(trained, digits, tmp_path,
                                                                                        monkeypatch):
    real, calls = tlc.compress, []

    def killed_on_the_second(*args, **kwargs):
        calls.append(kwargs["method"])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(bench.tlc, "compress", killed_on_the_second)
    with pytest.raises(KeyboardInterrupt):
        _run(trained, digits, tmp_path)
    state = json.loads((tmp_path / "benchmark-state.json").read_text())
    assert list(state["entries"]) == ["tlc"]
    with pytest.raises(SpecError, match="already holds a benchmark"):
        _run(trained, digits, tmp_path)
    with pytest.raises(SpecError, match="other settings .*max_steps"):
        _run(trained, digits, tmp_path, resume=True, max_steps=2)
    calls.clear()
    monkeypatch.setattr(bench.tlc, "compress", lambda *a, **k: calls.append(k["method"]) or real(*a, **k))
    resumed = _run(trained, digits, tmp_path, resume=True)
    assert calls == ["easier", "layer_collapse"]  # tlc was loaded back, not rerun
    assert [r["status"] for r in resumed.rows] == ["done"] * 4
    fresh = _run(trained, digits, tmp_path / "fresh")
    for a, b in zip(resumed.rows, fresh.rows):
        assert (a["label"], a["val_accuracy"], a["depth"], a["macs"]) == (b["label"], b["val_accuracy"], b["depth"],
                                                                          b["macs"])


def test_a_method_that_cannot_run_gets_a_row_that_says_why(trained, digits, tmp_path, monkeypatch):
    real = tlc.compress

    def refuses_easier(*args, **kwargs):
        if kwargs["method"] == "easier":
            raise TLCError("no activation site this method can read")
        return real(*args, **kwargs)

    monkeypatch.setattr(bench.tlc, "compress", refuses_easier)
    result = _run(trained, digits, tmp_path, methods=["tlc", "easier"])
    row = result.rows[2]
    assert (row["label"], row["status"]) == ("easier", "failed")
    assert row["reason"] == "no activation site this method can read"
    assert "latency" not in row and "not run: no activation site" in str(result)
    assert (tmp_path / "pareto.png").is_file()
    monkeypatch.setattr(bench.tlc, "compress", real)  # resumed: the refused method is tried again, tlc is not
    resumed = _run(trained, digits, tmp_path, methods=["tlc", "easier"], resume=True)
    assert [r["status"] for r in resumed.rows] == ["done"] * 3 and resumed.rows[1] == result.rows[1] | {
        "latency": resumed.rows[1]["latency"]}


def test_bad_method_lists_and_settings_are_refused_before_any_work(trained, digits, tmp_path):
    with pytest.raises(SpecError, match="no preset 'fast'"):
        parse_entries(["tlc:fast"])
    with pytest.raises(TLCError, match="nosuch"):
        parse_entries(["nosuch"])
    with pytest.raises(SpecError, match="listed twice: tlc"):
        parse_entries(["tlc", "tlc:default"])
    assert [e.label for e in parse_entries(None)] == tlc.available_methods()
    with pytest.raises(SpecError, match="shortlist is not a run setting"):
        _run(trained, digits, tmp_path, shortlist=2)
    with pytest.raises(SpecError, match="unknown baseline"):
        _run(trained, digits, tmp_path, baselines=["magnitude"])
    assert not tmp_path.joinpath("benchmark-state.json").exists()
    with pytest.raises(ValueError):
        Timing(backends=("tensorrt",))


def test_line_up_times_every_model_in_one_session_against_each_reference():
    torch.manual_seed(0)
    small = nn.Sequential(nn.Linear(32, 32))
    big = nn.Sequential(*[nn.Linear(32, 32) for _ in range(40)])
    lineup = line_up({"big": big, "small": small, "same": small}, torch.randn(2, 32), references=["big", "small"],
                     batch_sizes=(1, 8), repeats=12, rounds=4, threads=1)
    assert [(r["backend"], r["batch_size"]) for r in lineup.rows] == [("eager", 1), ("eager", 8)]
    assert lineup.macs["big"] == 40 * lineup.macs["small"] and lineup.params["small"] == 32 * 33
    for row in lineup.rows:
        assert row["models"]["big"]["speedup"]["big"] == {"ratio": 1.0, "q1": 1.0, "q3": 1.0}
        assert row["models"]["small"]["speedup"]["big"]["ratio"] > 3  # 40 layers against one
    assert lineup.speedup("small", "big", "eager", 8)["ratio"] > 3
    with pytest.raises(SpecError, match="unknown reference"):
        line_up({"a": small}, torch.randn(2, 32), references=["b"])


def test_cli_benchmark_and_report(tmp_path, capsys):
    out = tmp_path / "bench"
    code = main(["benchmark", "--model", "tlc:tiny_cnn", "--data", "digits", "--out", str(out), "--train-epochs", "2",
                 "--methods", "tlc", "easier", "--finetune-epochs", "0.1", "--max-steps", "1", "--backends", "eager",
                 "--latency-batch-size", "2", "--threads", "1", "--quiet"])
    printed = capsys.readouterr().out
    assert code == 0 and "speed-up eager@1" in printed and "easier" in printed
    assert tlc.load(out / "runs" / "tlc-default") is not None  # a tlc: model spec: no code to trust
    assert main(["report", str(out)]) == 0
    assert "vs BN-folded" in capsys.readouterr().out
    assert main(["benchmark", "--model", "tlc:tiny_cnn", "--data", "digits", "--out", str(tmp_path / "x"),
                 "--methods", "tlc:fast"]) == 2
    assert "tlc: error: method tlc has no preset 'fast'" in capsys.readouterr().err
    assert main(["benchmark", "--model", "tlc:tiny_cnn", "--data", "digits", "--out", str(out), "--methods", "tlc",
                 "easier", "--quiet"]) == 2
    assert "already holds a benchmark" in capsys.readouterr().err


def test_the_torch_pruning_baseline_row_is_matched_to_the_best_depth_result(trained, digits, tmp_path):
    pytest.importorskip("torch_pruning", reason="the peers extra (torch-pruning) is not installed")
    result = _run(trained, digits, tmp_path, methods=["tlc", "layer_fusion"], baselines=["torch-pruning"])
    original, depth_rows, width = result.rows[0], result.rows[1:3], result.rows[3]
    best = bench.best_depth_row(depth_rows, original)
    assert best is not None and best["label"] == "tlc" and best["macs"] < original["macs"]
    assert (width["label"], width["kind"], width["status"], width["matched_to"]) == \
        ("torch-pruning", "width", "done", "tlc")
    assert width["macs"] <= best["macs"] and width["finetune_epochs"] == pytest.approx(best["finetune_epochs"])
    assert width["latency"]["eager@1"]["speedup"]["original"]["ratio"] > 0
    x = digits[0].example_inputs(3)
    assert result.models["torch-pruning"](x).shape == (3, 10)
    again = _run(trained, digits, tmp_path, methods=["tlc", "layer_fusion"], baselines=["torch-pruning"], resume=True)
    assert again.rows[3]["macs"] == width["macs"]  # rebuilt from its folder, not pruned again
    torch.testing.assert_close(again.models["torch-pruning"](x), result.models["torch-pruning"](x))
