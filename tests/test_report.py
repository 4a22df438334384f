"""`tlc report DIR`: the before/after table and the PNG plots drawn from report.json alone."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tlc.cli import main
from tlc.errors import TLCError
from tlc.io.plots import _block_keys, _columns, _lines, write_plots

pytest.importorskip("matplotlib")

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PLOTS = ["accuracy_vs_activations.png", "accuracy_vs_speedup.png", "network_map.png"]


def synthetic_network(blocks: int = 12) -> list[dict]:
    """A ResNet-like network map: stem, ``blocks`` blocks of 8 entries, head; odd blocks collapse their
    first activation and merge their first two convolutions."""
    net = [{"kind": "conv", "name": "stem.conv", "into": "tlc_merged.stem_bn"},
           {"kind": "site", "name": "stem.relu", "status": "kept"}]
    for i in range(blocks):
        merged = i % 2 == 1
        first = f"tlc_merged.add_{i}" if merged else f"tlc_merged.blocks_{i}_bn1"
        net += [
            {"kind": "conv", "name": f"blocks.{i}.conv1", "into": first},
            {"kind": "site", "name": f"blocks.{i}.relu1", "status": "collapsed" if merged else "kept"},
            {"kind": "conv", "name": f"blocks.{i}.conv2", "into": first if merged else f"tlc_merged.blocks_{i}_bn2"},
            {"kind": "site", "name": f"blocks.{i}.relu2", "status": "kept"},
            {"kind": "conv", "name": f"blocks.{i}.conv3", "into": f"tlc_merged.blocks_{i}_bn3"},
            {"kind": "site", "name": f"blocks.{i}.relu3", "status": "kept"},
            {"kind": "conv", "name": f"blocks.{i}.shortcut.0", "into": f"tlc_merged.blocks_{i}_shortcut_1"},
            {"kind": "site", "name": f"blocks.{i}.relu4", "status": "kept"},
        ]
    return net + [{"kind": "linear", "name": "head.fc", "into": "head.fc"}]


def step(number: int, activations: int, accuracy: float, accepted: bool) -> dict:
    return {"step": number, "sites": [f"blocks.{number}.relu1"], "removed_channels": 3, "linearized_channels": 13,
            "joint_gap": 0.01 * number, "val_accuracy": accuracy, "val_loss": 0.1, "within_budget": accepted,
            "accepted": accepted, "activations": activations, "params": 1000 - number, "macs": 50000 - 10 * number,
            "depth": 40 - 2 * number, "speedup": 1.0 + 0.1 * number, "finetune_epochs": 1.0, "seconds": 2.0,
            "note": ""}


def synthetic_report(steps: int = 5, network: bool = True) -> dict:
    """A report as ``tlc compress`` writes it: rejected steps 3 and 5, chosen step 4 (when there are steps)."""
    rejected = (3, 5)
    records = [step(n, 49 - n, 0.97 - 0.004 * n - 0.012 * (n in rejected), accepted=n not in rejected)
               for n in range(1, steps + 1)]
    chosen = max((r["step"] for r in records if r["accepted"]), default=0)
    final = next((r for r in records if r["step"] == chosen), None)
    report = {
        "tlc_version": "0.1.0", "method": "tlc", "preset": "default", "config": {"max_acc_drop": 2.0},
        "model": {"spec": "tlc:synthetic", "num_classes": 10, "in_channels": 3, "kwargs": {}}, "data": "digits",
        "device": "cpu", "threads": 2,
        "original": {"params": 1000, "macs": 50000, "depth": 40, "activations": 49, "val_accuracy": 0.97,
                     "test_accuracy": 0.96},
        "compressed": {"params": final["params"] if final else 1000, "macs": final["macs"] if final else 50000,
                       "depth": final["depth"] if final else 40, "activations": final["activations"] if final else 49,
                       "val_accuracy": final["val_accuracy"] if final else 0.97, "test_accuracy": 0.95},
        "latency": {"rows": [{"backend": "eager", "batch_size": 1, "a_median_ms": 2.0, "b_median_ms": 1.5,
                              "ratio": 1.33, "ratio_q1": 1.3, "ratio_q3": 1.36}]},
        "steps": records, "chosen_step": chosen, "stop_reason": "accuracy budget spent",
        "sites_collapsed": [s for r in records if r["accepted"] for s in r["sites"]],
        "finetune_epochs_total": float(len(records)),
        "merge": [{"name": "tlc_merged.add_1", "replaces": ["conv(blocks.1.conv1)", "conv(blocks.1.conv2)"],
                   "layer": "Conv2d(8->8, 5x5)", "weight_ops": 2, "removed_channels": 0}],
        "wall_time_s": 12.0,
    }
    if network:
        report["network"] = synthetic_network()
    return report


def check_png(path: Path) -> tuple[int, int]:
    """Assert ``path`` is a PNG that matplotlib reads back; return its (height, width) in pixels."""
    import matplotlib.image

    assert path.read_bytes()[:8] == PNG_MAGIC
    pixels = matplotlib.image.imread(path)
    assert pixels.ndim == 3 and pixels.shape[2] in (3, 4)
    return pixels.shape[0], pixels.shape[1]


def test_plots_of_a_run_with_rejected_steps_and_a_network_of_a_hundred_entries(tmp_path):
    report = synthetic_report()
    assert len(report["network"]) == 99
    written = write_plots(report, tmp_path / "plots")
    assert [p.name for p in written] == PLOTS
    for path in written:
        height, width = check_png(path)
        assert 400 <= width <= 4000 and 300 <= height <= 4000, (path.name, width, height)


def test_plots_of_a_run_without_steps(tmp_path):
    written = write_plots(synthetic_report(steps=0), tmp_path)
    assert [p.name for p in written] == PLOTS
    for path in written:
        check_png(path)


def test_reports_without_a_network_get_no_map(tmp_path):
    written = write_plots(synthetic_report(network=False), tmp_path)
    assert [p.name for p in written] == PLOTS[:2]


def test_map_blocks_follow_the_names():
    names = ["conv1", "relu", "layer1.0.conv1", "layer1.0.relu1", "layer1.1.conv1", "layer2.0.conv1", "fc"]
    assert _block_keys(names) == ["", "", "layer1", "layer1", "layer1", "layer2", ""]
    bert = [f"bert.encoder.layer.{i}.{part}" for i in range(12)
            for part in ("attention.self.query", "intermediate.dense", "intermediate.act", "output.dense")]
    assert _block_keys(bert)[:5] == ["bert.encoder.layer.0"] * 4 + ["bert.encoder.layer.1"]


def test_map_columns_hold_every_entry_once_and_repeat_a_cut_heading():
    keys = _block_keys([e["name"] for e in synthetic_network(blocks=25)])
    columns = _columns(_lines(keys))
    assert len(columns) > 1
    entries = [line.entry for column in columns for line in column if line.entry is not None]
    assert entries == list(range(len(keys)))
    for column in columns:
        assert column[0].entry is None  # every column starts with its block's heading


def write_report(directory: Path, report: dict) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "report.json").write_text(json.dumps(report))
    return directory


def test_report_command_prints_the_table_and_writes_the_plots(tmp_path, capsys):
    run = write_report(tmp_path / "run", synthetic_report())
    assert main(["report", str(run)]) == 0
    out = capsys.readouterr().out
    assert "val accuracy" in out and "97.00%" in out and "latency eager b1" in out
    assert "steps: 5, chosen: 4, stop: accuracy budget spent" in out
    for name in PLOTS:
        assert f"wrote {run / name}" in out
        check_png(run / name)


def test_report_command_without_plots(tmp_path, capsys):
    run = write_report(tmp_path / "run", synthetic_report())
    assert main(["report", str(run), "--no-plots"]) == 0
    assert "wrote" not in capsys.readouterr().out
    assert not list(run.glob("*.png"))


def test_report_command_on_a_directory_without_report_json(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tlc: error: no report.json in ")
    assert captured.out == ""


def test_missing_matplotlib_is_one_error_line_naming_the_install(tmp_path, capsys, monkeypatch):
    run = write_report(tmp_path / "run", synthetic_report())
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # makes the import fail
    with pytest.raises(TLCError, match="pip install matplotlib"):
        write_plots(synthetic_report(), tmp_path)
    assert main(["report", str(run)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install matplotlib" in err[0]


@pytest.mark.parametrize(("row", "expected"), [
    ({"ratio": 1.46, "ratio_q1": 1.40, "ratio_q3": 1.52}, "x1.46 faster (ratios 1.40-1.52)"),
    ({"ratio": 0.8, "ratio_q1": 0.78, "ratio_q3": 0.83}, "x1.25 slower (ratios 0.78-0.83)"),
    ({"ratio": 1.29, "ratio_q1": 0.22, "ratio_q3": 4.51}, "no measurable change (ratios 0.22-4.51, noisy)"),
    ({"ratio": 1.03, "ratio_q1": 0.98, "ratio_q3": 1.06}, "no measurable change (ratios 0.98-1.06)"),
    ({"ratio": 2.0, "ratio_q1": 1.2, "ratio_q3": 2.5}, "x2.00 faster (ratios 1.20-2.50, noisy)"),
    ({"ratio": 1.1}, "x1.10 faster"),
])
def test_the_table_says_slower_and_flags_ratios_too_spread_to_tell(row, expected):
    from tlc.report.tables import speed_change

    assert speed_change(row) == expected
