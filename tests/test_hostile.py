"""A run folder is data from elsewhere: `tlc.load` and `tlc export` run no code it names unless trusted,
read nothing outside it, allocate nothing its recipe inflates, and check the weights before using them.
Each hostile folder is a tampered copy of a real one and must be refused with one clear SpecError line."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest
import torch

import tlc
from tlc.cli import main
from tlc.errors import SpecError
from tlc.zoo.models import ModelSpec

from .helpers import randomize_bn

SPEC = ModelSpec("tlc:tiny_cnn", num_classes=3, in_channels=1, kwargs={"width": 4})


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(folder, deploy form, example inputs): tiny_cnn with a site collapsed (one channel removed) and
    merged, saved with its model spec as `tlc compress` saves its result."""
    torch.manual_seed(0)
    model = randomize_bn(SPEC.build()).eval()
    x = torch.randn(2, 1, 8, 8)
    site = tlc.find_sites(model, x)[0]
    mask = torch.ones(site.channels)
    mask[0] = 0
    deploy = tlc.merge(tlc.linearize(model, [site.name], x, masks={site.name: mask}), x)
    folder = tmp_path_factory.mktemp("saved") / "run"
    tlc.save(deploy, folder, example_inputs=x, model_spec=SPEC.to_json())
    return folder, deploy, x


@pytest.fixture
def run(saved, tmp_path) -> Path:
    """A copy of the saved folder, to tamper with."""
    return Path(shutil.copytree(saved[0], tmp_path / "run"))


def tamper(folder: Path, **changes) -> Path:
    """Rewrite recipe.json with ``changes`` (a callable value gets the old value)."""
    path = folder / "recipe.json"
    recipe = json.loads(path.read_text())
    for key, value in changes.items():
        recipe[key] = value(recipe.get(key)) if callable(value) else value
    path.write_text(json.dumps(recipe))
    return folder


def refused(folder: Path, match: str, **kwargs) -> str:
    """tlc.load refuses the folder with one SpecError line matching ``match``, quickly."""
    began = time.perf_counter()
    with pytest.raises(SpecError, match=match) as info:
        tlc.load(folder, **kwargs)
    message = str(info.value)
    assert "\n" not in message and time.perf_counter() - began < 20
    return message


def test_the_untampered_folder_loads_to_the_saved_function(saved):
    folder, deploy, x = saved
    assert (folder / "recipe.json").is_file()
    with torch.no_grad():
        assert torch.equal(tlc.load(folder)(x), deploy(x))


# --- code ----------------------------------------------------------------------------------------------


EVIL = '''
from pathlib import Path
Path({marker!r}).write_text("imported")

from tlc.zoo.cifar import tiny_cnn

def build(num_classes, in_channels, width):
    return tiny_cnn(num_classes, in_channels, width)
'''


@pytest.fixture
def code_run(run, tmp_path) -> tuple[Path, Path, Path]:
    """(folder whose model spec is a py: file, the file, the marker its import writes)."""
    marker, evil = tmp_path / "imported.txt", tmp_path / "evil.py"
    evil.write_text(EVIL.format(marker=str(marker)))
    tamper(run, model=lambda m: {**m, "spec": f"py:{evil}:build"})
    return run, evil, marker


def test_a_py_model_spec_is_refused_without_importing_it(code_run, capsys):
    folder, evil, marker = code_run
    message = refused(folder, "trust_code=True")
    assert str(evil) in message and "--trust-code" in message
    capsys.readouterr()
    assert main(["export", str(folder), "--onnx"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("tlc: error: ") and "--trust-code" in err[0]
    assert not marker.exists()  # the file was never imported
    assert not (folder / "model.onnx").exists()


def test_trust_code_runs_the_py_file_and_loads(code_run, saved):
    folder, _, marker = code_run
    _, deploy, x = saved
    with torch.no_grad():
        assert torch.equal(tlc.load(folder, trust_code=True)(x), deploy(x))
    assert marker.read_text() == "imported"


def test_a_given_model_instance_needs_no_trust(code_run, saved):
    folder, _, marker = code_run
    _, deploy, x = saved
    with torch.no_grad():
        assert torch.equal(tlc.load(folder, model=SPEC.build())(x), deploy(x))
    assert not marker.exists()


@pytest.mark.parametrize("kwargs", [{"checkpoint_path": "/etc/passwd"}, {"pretrained": True}])
def test_builder_options_that_load_files_are_refused(run, kwargs):
    tamper(run, model={"spec": "timm:resnet18", "num_classes": 3, "in_channels": 1, "kwargs": kwargs})
    refused(run, "would make the builder load files or code")


def test_trust_remote_code_in_an_hf_spec_is_refused(run):
    tamper(run, model={"spec": "hf:bert", "num_classes": 3, "kwargs": {"trust_remote_code": True}}, hf_config="cfg")
    refused(run, "trust_remote_code would make the builder load files or code", trust_code=True)


# --- paths ---------------------------------------------------------------------------------------------


def test_weights_outside_the_folder_are_refused(run, tmp_path):
    outside = tmp_path / "x.safetensors"
    shutil.copyfile(run / "weights.safetensors", outside)  # a valid file: it is where it is, not what it is
    refused(tamper(run, weights="../x.safetensors"), "outside")
    refused(tamper(run, weights=str(outside)), "outside")
    (run / "link.safetensors").symlink_to(outside)
    refused(tamper(run, weights="link.safetensors"), "links outside")


def test_a_recipe_json_linking_outside_is_refused(run, tmp_path):
    shutil.move(run / "recipe.json", tmp_path / "recipe.json")
    (run / "recipe.json").symlink_to(tmp_path / "recipe.json")
    refused(run, "links outside")


def test_an_hf_folder_outside_is_read_only_when_trusted(run, tmp_path):
    elsewhere = tmp_path / "bert"  # need not exist: the refusal comes before anything is read
    tamper(run, model={"spec": f"hf:{elsewhere}", "num_classes": 3})
    message = refused(run, "trust_code=True")
    assert str(elsewhere) in message and "outside" in message
    refused(tamper(run, hf_config="../bert"), "outside")


# --- sizes and dtypes ----------------------------------------------------------------------------------


@pytest.mark.parametrize("tensor,match", [
    ({"shape": [2**17, 2**17], "dtype": "float32"}, "more than the"),  # 64 GiB
    ({"shape": [2, 1, 2**12, 2**12], "dtype": "float32"}, "more than the"),  # 128 MiB: above the cap too
    ({"shape": [2, -1, 8, 8], "dtype": "float32"}, "non-negative integers"),
    ({"shape": [1] * 9, "dtype": "float32"}, "at most 8"),
    ({"shape": "2,1,8,8", "dtype": "float32"}, "shape must be a list"),
    ({"shape": [2, 3], "dtype": "int64", "values": [1, 2, 3]}, "the 6 values"),
    ({"shape": [2, 3], "dtype": "int64"}, "must list their values"),
    ({"shape": [2], "dtype": "int8", "values": [1, 1000]}, "1000 is not a int8"),
    ({"shape": [2], "dtype": "int64", "values": [1, 2.5]}, "2.5 is not a int64"),
    ({"shape": [2], "dtype": "float32", "values": [1.0, 2.0]}, "integer inputs only"),
    ({"shape": [2, 1, 8, 8], "dtype": "load"}, "unknown dtype 'load'"),
    ({"shape": [2, 1, 8, 8], "dtype": "Tensor"}, "unknown dtype 'Tensor'"),
    ({"shape": [2, 1, 8, 8], "dtype": "float99"}, "unknown dtype 'float99'"),
    ({"shape": [2, 1, 8, 8], "dtype": "__class__"}, "unknown dtype"),
    ({"shape": [2, 1, 8, 8], "dtype": ["float32"]}, "unknown dtype"),
])
def test_example_inputs_are_validated_before_anything_is_allocated(run, tensor, match):
    refused(tamper(run, example_inputs={"tensor": tensor}), match)


def test_deeply_nested_example_inputs_are_refused(run):
    desc = {"tensor": {"shape": [1], "dtype": "float32"}}
    for _ in range(20):
        desc = {"tuple": [desc]}
    refused(tamper(run, example_inputs=desc), "nested")


def test_an_inflated_architecture_is_refused_before_it_is_built(run):
    tamper(run, model=lambda m: {**m, "kwargs": {"width": 100_000}})  # 10^11 values: 400 GB of float32
    message = refused(run, "refused before building it")
    assert "tlc:tiny_cnn" in message


def test_a_recipe_json_too_large_is_not_read(run, monkeypatch):
    import tlc.io.recipe as recipe

    monkeypatch.setattr(recipe, "MAX_RECIPE_BYTES", 100)
    refused(run, "more than a recipe holds")


# --- weights -------------------------------------------------------------------------------------------


def test_a_truncated_weights_file_is_refused(run):
    path = run / "weights.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    refused(run, "not a complete safetensors file")


def test_a_weights_file_that_is_not_safetensors_is_refused(run):
    (run / "weights.safetensors").write_bytes(b"\xff" * 64)
    refused(run, "not a complete safetensors file")


@pytest.mark.parametrize("change,match", [
    (lambda w, k: {**w, k: torch.zeros(*w[k].shape, 2)}, r"the rebuilt model's is F32"),  # another shape
    (lambda w, k: {**w, k: w[k].double()}, r"is F64 .* the rebuilt model's is F32"),  # another dtype
    (lambda w, k: {n: v for n, v in w.items() if n != k}, "1 missing"),
    (lambda w, k: {**w, "extra.weight": torch.zeros(1)}, "1 unexpected"),
])
def test_weights_that_do_not_fit_the_rebuilt_model_are_refused_from_their_header(run, change, match):
    from safetensors.torch import load_file, save_file

    path = run / "weights.safetensors"
    weights = load_file(str(path))
    key = next(k for k, v in weights.items() if v.dim() == 4)
    save_file(change(weights, key), str(path))
    refused(run, match)


# --- the recipe's other fields -------------------------------------------------------------------------


@pytest.mark.parametrize("changes,match", [
    ({"form": "pickle"}, "form must be one of"),
    ({"policy": "anything"}, "policy must be one of"),
    ({"zeros": {"conv": {"weight": ["0"]}}}, "zeros must map"),
    ({"version": "2"}, "version must be a positive integer"),
    ({"version": 99}, "newer tlc"),
    ({"format": "pickle"}, "not a tlc recipe"),
    ({"model": "tlc:tiny_cnn"}, "model must be a model spec object"),
    ({"model": None}, "names no model spec"),
    ({"model": {"spec": "tlc:tiny_cnn", "num_classes": -3}}, "num_classes must be a positive integer"),
    ({"edits": "linearize"}, "edits must be a list"),
    ({"edits": [{"kind": "exec", "code": "print(1)"}]}, "unknown edit kind 'exec'"),
    ({"edits": [{"kind": "linearize"}]}, "malformed edits"),
    ({"edits": [{"kind": "linearize", "site_names": "relu1"}]}, "'site_names' is malformed"),
    ({"edits": [{"kind": "linearize", "site_names": ["relu1"], "masks": {"relu1": [2, 0, 1, 1]}}]},
     "'masks' is malformed"),
    ({"edits": [{"kind": "linearize", "site_names": ["relu1"], "paddings": {"conv1": [10**6, 10**6]}}]},
     "'paddings' is malformed"),
    ({"edits": [{"kind": "linearize", "site_names": ["no_such_site"]}]}, "no_such_site"),
    ({"edits": [{"kind": "weight_mask", "sparsity": {"conv1.weight": "all"}}]}, "'sparsity' is malformed"),
])
def test_malformed_recipe_fields_are_one_clear_error(run, changes, match):
    refused(tamper(run, **changes), match)


def test_a_recipe_that_is_not_json_or_not_an_object(run):
    (run / "recipe.json").write_text("{not json")
    refused(run, "not valid JSON")
    (run / "recipe.json").write_text("[1, 2]")
    refused(run, "not a tlc recipe")
    (run / "recipe.json").write_bytes(b"\xff\xfe\x00")
    refused(run, "not a text file|not valid JSON")


def test_export_refuses_a_tampered_folder_in_one_line(run, capsys):
    tamper(run, weights="/etc/hostname")
    assert main(["export", str(run), "--onnx"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "outside" in err[0] and "Traceback" not in err[0]


# --- Hugging Face --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bert_run(tmp_path_factory):
    """(run folder, deploy form, inputs, the hf folder): a tiny BERT whose folder holds the base model only,
    so that building the classifier from it is what makes transformers print its load report."""
    transformers = pytest.importorskip("transformers")
    from tlc.zoo.models import parse_model_spec

    tmp = tmp_path_factory.mktemp("bert")
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=32)
    torch.manual_seed(0)
    transformers.BertModel(cfg).save_pretrained(tmp / "hf")
    spec = parse_model_spec(f"hf:{tmp / 'hf'}", num_classes=2)
    model = spec.build().eval()
    x = {"input_ids": torch.randint(5, 50, (2, 7)), "attention_mask": torch.ones(2, 7, dtype=torch.long)}
    deploy = tlc.merge(tlc.linearize(model, tlc.find_sites(model, x)[:1], x), x)
    tlc.save(deploy, tmp / "run", example_inputs=x, model_spec=spec.to_json())
    return tmp / "run", deploy, x, tmp / "hf"


def _quiet_load(capsys, caplog, folder: Path, **kwargs) -> torch.nn.Module:
    capsys.readouterr()
    loaded = tlc.load(folder, **kwargs)
    printed = "".join(capsys.readouterr()) + caplog.text
    for noise in ("LOAD REPORT", "newly initialized", "Loading weights", "TRAIN"):
        assert noise not in printed, printed
    return loaded


def test_an_hf_run_loads_quietly_from_its_own_folder(bert_run, tmp_path, capsys, caplog):
    folder, deploy, x, hf = bert_run
    assert (folder / "hf_config" / "config.json").is_file()
    moved = Path(shutil.copytree(folder, tmp_path / "moved"))
    hidden = hf.rename(hf.with_name("hf_hidden"))  # the original folder is not needed, nor read
    try:
        loaded = _quiet_load(capsys, caplog, moved)
        again = tlc.save(loaded, tmp_path / "again", example_inputs=x)  # a loaded model saves on its own too
        reloaded = _quiet_load(capsys, caplog, again)
    finally:
        hidden.rename(hf)
    with torch.no_grad():
        assert torch.equal(loaded(**x).logits, deploy(**x).logits)
        assert torch.equal(reloaded(**x).logits, deploy(**x).logits)


def test_an_hf_run_without_its_config_copy_needs_trust(bert_run, tmp_path, capsys, caplog):
    folder, deploy, x, hf = bert_run
    old = Path(shutil.copytree(folder, tmp_path / "old"))
    shutil.rmtree(old / "hf_config")
    tamper(old, hf_config=None)
    assert str(hf) in refused(old, "outside")
    loaded = _quiet_load(capsys, caplog, old, trust_code=True)
    with torch.no_grad():
        assert torch.equal(loaded(**x).logits, deploy(**x).logits)


def test_transformers_logging_level_is_restored(bert_run):
    transformers = pytest.importorskip("transformers")
    logging = transformers.utils.logging
    before = logging.get_verbosity()
    logging.set_verbosity_info()
    try:
        tlc.load(bert_run[0])
        assert logging.get_verbosity() == logging.INFO
    finally:
        logging.set_verbosity(before)


@pytest.mark.skipif(os.name != "posix", reason="symlinks")
def test_hf_config_linking_outside_is_refused(bert_run, tmp_path):
    folder = Path(shutil.copytree(bert_run[0], tmp_path / "run"))
    shutil.rmtree(folder / "hf_config")
    (folder / "hf_config").symlink_to(bert_run[3])
    refused(folder, "links outside")
