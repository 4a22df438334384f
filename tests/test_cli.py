"""CLI: every user error is one `tlc: error:` line and exit status 2, never a traceback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tlc.cli import main

from .helpers import same_weights


def _error(capsys, argv):
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith("tlc: error: "), err
    assert "Traceback" not in err[0]
    return err[0]


@pytest.mark.parametrize("argv,expected", [
    (["--model", "nope:thing", "--data", "digits"], "nope"),
    (["--model", "torchvision:resnet1800", "--data", "digits"], "resnet18"),
    (["--model", "tlc:cifar_resnet18", "--data", "imagenet-21k"], "imagenet-21k"),
    (["--model", "tlc:cifar_resnet18", "--data", "cifar10:/no/such/dir"], "/no/such/dir"),
    (["--model", "tlc:cifar_resnet18", "--data", "digits", "--weights", "/no/such.safetensors"], "no/such"),
    (["--model", "tlc:cifar_resnet18", "--data", "digits", "--num-classes", "7"], "7"),
    (["--model", "tlc:cifar_resnet18", "--data", "glue:sst2:/tmp"], "tokenizer"),
    (["--model", "py:/no/file.py:build", "--data", "digits"], "/no/file.py"),
])
def test_compress_errors(capsys, tmp_path, argv, expected):
    line = _error(capsys, ["compress", *argv, "--out", str(tmp_path / "out")])
    assert expected in line


def test_weights_that_do_not_fit(capsys, tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "w.safetensors"
    save_file({"fc.weight": torch.zeros(3, 3)}, str(path))
    line = _error(capsys, ["compress", "--model", "tlc:cifar_resnet18", "--data", "digits", "--weights", str(path),
                           "--out", str(tmp_path / "o")])
    assert "missing" in line or "unexpected" in line


def test_model_that_cannot_take_the_data(capsys, tmp_path):
    model_file = tmp_path / "net.py"
    model_file.write_text("import torch\n\ndef build(num_classes):\n"
                          "    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(999, num_classes))\n")
    line = _error(capsys, ["compress", "--model", f"py:{model_file}:build", "--data", "digits",
                           "--out", str(tmp_path / "o")])
    assert "cannot take" in line


def test_report_and_export_of_a_directory_that_is_no_run(capsys, tmp_path):
    assert "report.json" in _error(capsys, ["report", str(tmp_path)])
    assert "recipe.json" in _error(capsys, ["export", str(tmp_path), "--onnx"])


def test_argument_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["compress", "--model", "tlc:cifar_resnet18"])
    assert exc.value.code == 2


def test_compress_options_reach_the_run_and_method_configs():
    from tlc.cli import _config, _parser
    from tlc.methods.tlc import PAPER, TLC
    from tlc.run.config import RunConfig

    args = _parser().parse_args(["compress", "--model", "tlc:tiny_cnn", "--data", "digits", "--out", "x",
                                 "--rejection-patience", "1", "--gap-tolerance", "0.5", "--preset", "paper",
                                 "--set", "branch_removal=true", "--set", "max_sites_per_step=3"])
    cls, run, own = _config(args)
    assert cls is TLC and run.preset == "paper"
    assert (run.rejection_patience, own.gap_tolerance, own.max_sites_per_step) == (1, 0.5, 3)
    assert own.branch_removal and own.multi_site_rule == PAPER["multi_site_rule"]
    assert run.finetune.epochs == PAPER["finetune"].epochs
    cls, run, own = _config(_parser().parse_args(["compress", "--model", "m", "--data", "d", "--out", "x"]))
    assert run == RunConfig() and own == TLC.Config()


@pytest.mark.parametrize("argv,expected", [
    (["--method", "nope"], "unknown method"),
    (["--preset", "fastest"], "no preset"),
    (["--set", "gap_tolerance"], "KEY=VALUE"),
    (["--set", "latency_aware=maybe"], "latency_aware"),
    (["--set", "max_sites_per_step=0"], "max_sites_per_step"),
])
def test_bad_method_settings_are_refused_before_any_work(capsys, tmp_path, argv, expected):
    line = _error(capsys, ["compress", "--model", "nope:thing", "--data", "digits", "--out", str(tmp_path / "o"),
                           *argv])
    assert expected in line  # the model spec is bad too: the settings were checked first


def test_reports_record_the_image_size_the_data_was_loaded_at():
    from tlc.cli import _data_label
    from tlc.zoo.data import load_data

    assert _data_label(load_data("digits", seed=0)) == "digits (1x8x8)"
    assert _data_label(load_data("digits", seed=0, image_size=16)) == "digits (1x16x16)"


# --- every bad input of `tlc compress` is one line, before any work -----------------------------------


def _tiny_cnn_weights(tmp_path, poison=None):
    from safetensors.torch import save_file

    from tlc.zoo.cifar import tiny_cnn

    state = {k: v.clone() for k, v in tiny_cnn(num_classes=10, in_channels=1).state_dict().items()}
    if poison is not None:
        state["conv2.weight"].view(-1)[3] = poison
    path = tmp_path / "w.safetensors"
    save_file(state, str(path))
    return path


def _text_pt(tmp_path):
    path = tmp_path / "w.pt"
    path.write_text("these are not weights\n")
    return path


def _a_file(tmp_path):
    path = tmp_path / "taken"
    path.write_text("x")
    return path


# (extra arguments given tmp_path, what the error line must say); the model and data are valid
BEFORE_ANY_WORK = [
    (lambda t: ["--out", str(_a_file(t))], "is a file, not a folder"),
    (lambda t: ["--out", str(_a_file(t) / "sub")], "is a file, not a folder"),
    (lambda t: ["--device", "gpu"], "unknown device"),
    (lambda t: ["--device", "cuda:99"], "cuda:99"),
    (lambda t: ["--device", "meta"], "cpu or cuda"),
    (lambda t: ["--latency-batch-sizes", "1", "0"], "--latency-batch-sizes 0"),
    (lambda t: ["--threads", "0"], "--threads 0 must be at least 1"),
    (lambda t: ["--num-classes", "0"], "--num-classes 0 must be at least 1"),
    (lambda t: ["--target-speedup", "-1"], "--target-speedup -1.0 must be a speed-up > 0"),
    (lambda t: ["--target-macs-ratio", "0"], "--target-macs-ratio 0.0 must be a fraction in (0, 1]"),
    (lambda t: ["--target-macs-ratio", "1.5"], "--target-macs-ratio 1.5"),
    (lambda t: ["--max-acc-drop", "-1"], "--max-acc-drop -1.0 must be a number of points >= 0"),
    (lambda t: ["--max-acc-drop", "nan"], "--max-acc-drop nan"),
    (lambda t: ["--max-steps", "0"], "--max-steps 0 must be at least 1"),
    (lambda t: ["--calibration-size", "0"], "--calibration-size 0 must be at least 1"),
    (lambda t: ["--batch-size", "0"], "--batch-size 0"),
    (lambda t: ["--lr", "0"], "--lr 0.0 must be a learning rate > 0"),
    (lambda t: ["--finetune-epochs", "-2"], "--finetune-epochs -2.0"),
    (lambda t: ["--train-epochs", "inf"], "--train-epochs inf"),
    (lambda t: ["--weights", str(t)], "is a folder: give the weights file"),
    (lambda t: ["--weights", str(_text_pt(t))], "neither a safetensors file nor a torch.save"),
]
if not torch.cuda.is_available():
    BEFORE_ANY_WORK.append((lambda t: ["--device", "cuda"], "no CUDA GPU is available here"))


@pytest.mark.parametrize("extra,expected", BEFORE_ANY_WORK)
def test_bad_compress_options_are_refused_before_any_work(capsys, tmp_path, monkeypatch, extra, expected):
    import tlc.cli as cli

    def no_work(*args, **kwargs):
        raise AssertionError("the options should have been refused before the model and data are loaded")

    monkeypatch.setattr(cli, "_load", no_work)
    out = tmp_path / "out"
    argv = ["compress", "--model", "tlc:tiny_cnn", "--data", "digits", "--out", str(out), *extra(tmp_path)]
    line = _error(capsys, argv)
    assert expected in line
    assert not out.exists()  # nothing left to block the corrected rerun


def test_an_out_folder_that_is_not_writable(capsys, tmp_path, monkeypatch):
    import tlc.cli as cli

    monkeypatch.setattr(cli.os, "access", lambda path, mode: Path(path) != tmp_path)
    line = _error(capsys, ["compress", "--model", "tlc:tiny_cnn", "--data", "digits", "--out", str(tmp_path / "o")])
    assert f"{tmp_path} is not writable" in line


def _pickled_hf_folder(tmp_path):
    pytest.importorskip("transformers")
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "bert", "vocab_size": 30, "hidden_size": 8,
                                                    "num_hidden_layers": 1, "num_attention_heads": 2,
                                                    "intermediate_size": 16}))
    (folder / "pytorch_model.bin").write_bytes(b"never read")
    return folder


@pytest.mark.parametrize("argv,expected", [
    (lambda t: ["--model", "tlc:tiny_cnn", "--weights", str(_tiny_cnn_weights(t, float("nan")))],
     "weight conv2.weight holds NaN or infinite values"),
    (lambda t: ["--model", "tlc:tiny_cnn", "--weights", str(_tiny_cnn_weights(t, float("inf")))],
     "weight conv2.weight holds NaN or infinite values"),
    (lambda t: ["--model", f"hf:{_pickled_hf_folder(t)}"], "tlc loads safetensors weights only"),
])
def test_weights_refused_when_loaded(capsys, tmp_path, argv, expected):
    out = tmp_path / "out"
    line = _error(capsys, ["compress", *argv(tmp_path), "--data", "digits", "--out", str(out)])
    assert expected in line and not out.exists()


@pytest.mark.parametrize("content,expected", [
    ("{not json", "report.json is not valid JSON"),
    ("[1, 2]", "report.json is not a tlc report"),
    ('{"original": {}}', "report.json is not a well-formed tlc report"),
])
def test_a_corrupt_report_json_is_named(capsys, tmp_path, content, expected):
    (tmp_path / "report.json").write_text(content)
    line = _error(capsys, ["report", str(tmp_path), "--no-plots"])
    assert expected in line and str(tmp_path / "report.json") in line


# --- the demo's training is checkpointed --------------------------------------------------------------


def test_interrupted_pretraining_continues_where_it_stopped(tmp_path, monkeypatch, capsys):
    """A training killed in its second epoch continues from the first epoch's checkpoint on the rerun, and
    ends with the weights an uninterrupted training gives."""
    import argparse

    import tlc.train.loop as train_loop
    from tlc.cli import _pretrain
    from tlc.zoo.data import load_data
    from tlc.zoo.models import build_model

    data = load_data("digits", seed=0)
    data.train = torch.utils.data.Subset(data.train, range(128))
    args = argparse.Namespace(seed=0, device="cpu", batch_size=32)

    def fresh():
        torch.manual_seed(0)
        return build_model("tlc:tiny_cnn", num_classes=10, in_channels=1, width=4)[0]

    whole = fresh()
    _pretrain(whole, data, 3, tmp_path / "whole", args, quiet=True)

    real_epoch, epochs = train_loop._Run.train_epoch, []

    def killed_in_the_second(self, epoch, *rest):
        epochs.append(epoch)
        if len(epochs) == 2:
            raise KeyboardInterrupt  # what SIGTERM / Ctrl-C does mid-epoch
        return real_epoch(self, epoch, *rest)

    monkeypatch.setattr(train_loop._Run, "train_epoch", killed_in_the_second)
    with pytest.raises(KeyboardInterrupt):
        _pretrain(fresh(), data, 3, tmp_path / "run", args, quiet=True)
    assert not (tmp_path / "run" / "trained.safetensors").exists()
    resumed = fresh()
    _pretrain(resumed, data, 3, tmp_path / "run", args, quiet=True)
    assert epochs == [0, 1, 1, 2]  # the rerun starts at the epoch that was cut, not at the first
    assert "continuing the interrupted training" in capsys.readouterr().out
    assert same_weights(resumed, whole)
    assert not (tmp_path / "run" / "pretrain").exists()  # checkpoints go once trained.safetensors is written


# --- the README's first Python snippet runs as written -------------------------------------------------


def test_the_readme_compress_snippet_runs(tmp_path, monkeypatch):
    """The snippet under "Compress your model", run as written, with its training and compression settings
    made tiny (the names, calls and outputs are what is checked)."""
    import dataclasses
    import re

    import tlc

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    section = readme.split("## Compress your model", 1)[1]
    snippet = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    real_fit, real_compress = tlc.train.fit, tlc.compress

    def short_fit(model, data, config, **kwargs):
        return real_fit(model, torch.utils.data.Subset(data, range(64)), dataclasses.replace(config, epochs=1),
                        **{**kwargs, "progress": False})

    def short_compress(*args, **kwargs):
        fast = {"max_steps": 1, "calibration_size": 32, "latency_repeats": 2, "progress": False, "log": None,
                "finetune": tlc.train.FitConfig(epochs=0.1)}
        return real_compress(*args, **{**kwargs, **fast})

    monkeypatch.setattr(tlc.train, "fit", short_fit)
    monkeypatch.setattr(tlc, "compress", short_compress)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(snippet, "README.md", "exec"), namespace)  # noqa: S102 - the project's own README
    assert (tmp_path / "runs" / "mine" / "recipe.json").is_file()
    assert namespace["result"].model is not None
