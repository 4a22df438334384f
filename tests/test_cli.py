"""CLI: every user error is one `tlc: error:` line and exit status 2, never a traceback."""

from __future__ import annotations

import pytest
import torch

from tlc.cli import main


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
