"""`tlc export DIR --onnx` on a run directory made without training: a narrow CIFAR ResNet-18 with two
sites collapsed and their layers merged, saved the way `tlc compress` saves its deploy form."""

from __future__ import annotations

import contextlib
import io

import pytest
import torch

import tlc
from tlc.cli import main
from tlc.io.recipe import load, save
from tlc.zoo.models import ModelSpec

from .helpers import randomize_bn, rel_err

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")


SITES = ["layer1.1.relu1", "layer3.0.relu1"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(run directory, deploy form, original, example inputs); two convolution pairs merged into one each."""
    spec = ModelSpec("tlc:cifar_resnet18", num_classes=5, in_channels=3, kwargs={"width": 8})
    torch.manual_seed(0)
    model = randomize_bn(spec.build()).eval()
    x = torch.randn(2, 3, 16, 16)
    deploy = tlc.merge(tlc.linearize(model, SITES, x, policy="always"), x)
    assert [r.weight_ops for r in deploy.tlc_report.records if r.weight_ops > 1] == [2, 3]
    directory = tmp_path_factory.mktemp("run")
    save(deploy, directory, example_inputs=x, model_spec=spec.to_json())
    return directory, deploy, model, x


@pytest.fixture(scope="module")
def exported(run):
    """(path of model.onnx, what `tlc export` printed): exported once for the whole module."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["export", str(run[0]), "--onnx"]) == 0
    return run[0] / "model.onnx", out.getvalue()


def run_onnx(path, x: torch.Tensor) -> torch.Tensor:
    from tlc.io.export import onnxruntime_session, session_feed

    session = onnxruntime_session(path)
    (out,) = session.run(None, session_feed(session, x))
    return torch.from_numpy(out)


def test_export_writes_a_model_that_onnxruntime_runs_like_the_saved_one(run, exported):
    directory, deploy, _, _ = run
    path, printed = exported
    assert printed.strip() == f"wrote {path} (checked against PyTorch with ONNX Runtime)"
    loaded = load(directory)
    x = torch.randn(3, 3, 16, 16)  # another batch size than the example: the batch dimension is dynamic
    with torch.no_grad():
        expected = loaded(x)
        assert rel_err(deploy(x), expected) < 1e-6
    assert rel_err(expected, run_onnx(path, x)) < 1e-4


def test_exported_graph_is_as_deep_as_the_deploy_form(run, exported):
    from tlc.io.export import onnx_depth

    _, deploy, original, x = run
    assert onnx_depth(exported[0]) == tlc.measure.depth(deploy, x) == tlc.measure.depth(original, x) - 2


def test_export_of_a_directory_without_recipe_json(tmp_path, capsys):
    assert main(["export", str(tmp_path), "--onnx"]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tlc: error: no recipe.json in ")
    assert not (tmp_path / "model.onnx").exists()


def test_export_of_a_damaged_recipe_is_one_error_line(tmp_path, capsys):
    (tmp_path / "recipe.json").write_text("{not json")
    assert main(["export", str(tmp_path), "--onnx"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "recipe.json is not valid JSON" in lines[0]
