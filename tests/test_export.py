"""Verified ONNX export and ONNX graph depth (tlc.io.export)."""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

from tlc.errors import TLCError, VerificationError

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
helper = onnx.helper

from tlc.io import export as export_module  # noqa: E402
from tlc.io.export import export_onnx, onnx_depth, onnx_op_counts, onnxruntime_max_opset  # noqa: E402


def run_onnx(path, feed: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return [torch.from_numpy(a) for a in session.run(None, {k: v.numpy() for k, v in feed.items()})]


def input_names(path) -> list[str]:
    return [i.name for i in onnx.load(str(path)).graph.input]


class ResidualCNN(nn.Module):
    """conv-bn-relu-conv plus identity skip: two weight layers on the longest path."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 3, 3, padding=1)

    def forward(self, x):
        return x + self.conv2(torch.relu(self.bn(self.conv1(x))))


def trained_bn(model: nn.Module) -> nn.Module:
    """Give BatchNorm non-trivial running statistics, then switch to eval."""
    model.train()
    with torch.no_grad():
        model(torch.randn(8, 3, 16, 16) * 3 + 1)
    return model.eval()


def test_residual_cnn_round_trip_with_dynamic_batch(tmp_path):
    model = trained_bn(ResidualCNN())
    path = export_onnx(model, torch.randn(2, 3, 16, 16), tmp_path / "res.onnx")
    assert path == tmp_path / "res.onnx" and path.exists()
    x = torch.randn(5, 3, 16, 16)
    (got,) = run_onnx(path, {input_names(path)[0]: x})
    with torch.no_grad():
        torch.testing.assert_close(got, model(x), rtol=1e-4, atol=1e-5)
    assert onnx_depth(path) == 2
    assert onnx_op_counts(path)["Conv"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["res.onnx"]


def test_resnet18_round_trip_and_depth(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.resnet18(num_classes=10).eval()
    path = export_onnx(model, torch.randn(1, 3, 32, 32), tmp_path / "r18.onnx")
    x = torch.randn(3, 3, 32, 32)
    (got,) = run_onnx(path, {input_names(path)[0]: x})
    with torch.no_grad():
        torch.testing.assert_close(got, model(x), rtol=1e-4, atol=1e-4)
    # conv1, 8 basic blocks of two 3x3 convs (downsample 1x1 convs sit on shorter parallel paths), fc
    assert onnx_depth(path) == 1 + 8 * 2 + 1
    assert onnx_op_counts(path)["Conv"] == 20


def tiny_bert():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, vocab_size=100)
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(config).eval()


def tokens(batch: int, length: int = 7) -> dict[str, torch.Tensor]:
    return {"input_ids": torch.randint(0, 100, (batch, length)),
            "attention_mask": torch.ones(batch, length, dtype=torch.long)}


def test_bert_dict_inputs_round_trip_and_depth(tmp_path):
    model = tiny_bert()
    path = export_onnx(model, tokens(2), tmp_path / "bert.onnx")
    assert input_names(path) == ["input_ids", "attention_mask"]
    feed = tokens(4)
    feed["attention_mask"][1, 4:] = 0  # padding is honoured, not baked in
    (got,) = run_onnx(path, feed)
    with torch.no_grad():
        torch.testing.assert_close(got, model(**feed).logits, rtol=1e-4, atol=1e-5)
    # per encoder layer: q/k/v projection -> (attention: products of activations) -> output dense
    # -> intermediate -> output: 4 weight layers; 2 layers, then pooler and classifier
    assert onnx_depth(path) == 2 * 4 + 2


class Chain(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))

    def forward(self, x):
        return self.layers(x)


def test_linear_chain_depth(tmp_path):
    path = export_onnx(Chain(), torch.randn(1, 6), tmp_path / "chain.onnx")
    assert onnx_depth(path) == 3
    assert onnx_depth(onnx.load(str(path))) == 3


def test_torchscript_fallback_when_dynamo_fails(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("simulated dynamo failure")

    monkeypatch.setattr(export_module, "_export_dynamo", broken)
    model = Chain().eval()
    with pytest.warns(UserWarning, match="simulated dynamo failure"):
        path = export_onnx(model, torch.randn(2, 6), tmp_path / "chain.onnx")
    assert onnx_depth(path) == 3
    x = torch.randn(4, 6)
    (got,) = run_onnx(path, {input_names(path)[0]: x})
    with torch.no_grad():
        torch.testing.assert_close(got, model(x), rtol=1e-4, atol=1e-6)


def test_torchscript_fallback_with_dict_inputs(tmp_path, monkeypatch):
    monkeypatch.setattr(export_module, "_export_dynamo", lambda *a, **k: 1 / 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = export_onnx(tiny_bert(), tokens(2), tmp_path / "bert.onnx")
    assert input_names(path) == ["input_ids", "attention_mask"]
    assert onnx_depth(path) == 2 * 4 + 2


class ExportDiffers(nn.Module):
    """Computes something else while being exported or traced, as a buggy export-time branch would."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 4)

    def forward(self, x):
        y = self.linear(x)
        if torch.compiler.is_exporting() or torch.jit.is_tracing():
            return y * 1.01
        return y


def test_mismatch_raises_and_leaves_no_file(tmp_path):
    target = tmp_path / "bad.onnx"
    with pytest.raises(VerificationError, match=r"max relative error [0-9.e-]+ > rtol"):
        export_onnx(ExportDiffers(), torch.randn(2, 4), target)
    assert list(tmp_path.iterdir()) == []


def test_unchecked_export_writes_the_mismatching_file(tmp_path):
    path = export_onnx(ExportDiffers(), torch.randn(2, 4), tmp_path / "bad.onnx", check=False)
    assert path.exists()


def test_fixed_batch_graph_fails_the_second_batch_check(tmp_path):
    model = Chain().eval()
    path = export_onnx(model, torch.randn(2, 6), tmp_path / "fixed.onnx", dynamic_batch=False)
    shape = [d.dim_value for d in onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim]
    assert shape == [2, 6]
    with pytest.raises(VerificationError, match="batch size 3"):
        export_module.verify_onnx(model, torch.randn(2, 6), path, dynamic_batch=True)


def test_opset_is_automatic_or_as_given(tmp_path):
    path = export_onnx(Chain(), torch.randn(2, 6), tmp_path / "auto.onnx")
    auto = {o.domain: o.version for o in onnx.load(str(path)).opset_import}[""]
    assert 18 <= auto <= onnxruntime_max_opset()
    path = export_onnx(Chain(), torch.randn(2, 6), tmp_path / "17.onnx", opset=17)
    assert {o.domain: o.version for o in onnx.load(str(path)).opset_import}[""] == 17


def test_onnxruntime_max_opset_is_loadable():
    version = onnxruntime_max_opset()
    assert 17 <= version <= onnx.defs.onnx_opset_version()


# ------------------------------------------------------------------------------- onnx_depth on built graphs

F32 = onnx.TensorProto.FLOAT


def build(nodes, initializers=(), inputs=("x",)) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info(n, F32, None) for n in inputs],
        [helper.make_tensor_value_info("y", F32, None)], initializer=list(initializers))
    return helper.make_model(graph)


def weight(name: str) -> onnx.TensorProto:
    return helper.make_tensor(name, F32, [2, 2], [1.0, 0.0, 0.0, 1.0])


def test_depth_counts_weights_through_transpose_and_constant_nodes():
    model = build([
        helper.make_node("Transpose", ["w1"], ["w1t"]),
        helper.make_node("MatMul", ["x", "w1t"], ["h1"]),
        helper.make_node("Constant", [], ["w2"], value=weight("c")),
        helper.make_node("Relu", ["h1"], ["r"]),
        helper.make_node("Gemm", ["r", "w2"], ["y"]),
    ], [weight("w1")])
    assert onnx_depth(model) == 2
    assert onnx_op_counts(model) == {"Transpose": 1, "MatMul": 1, "Constant": 1, "Relu": 1, "Gemm": 1}


def test_depth_ignores_products_of_activations_and_takes_the_longest_path():
    model = build([
        helper.make_node("MatMul", ["x", "wq"], ["q"]),
        helper.make_node("MatMul", ["x", "wk"], ["k"]),
        helper.make_node("MatMul", ["q", "k"], ["scores"]),  # q @ k^T: no weight
        helper.make_node("MatMul", ["scores", "wo"], ["o"]),
        helper.make_node("MatMul", ["o", "wo"], ["o2"]),
        helper.make_node("Add", ["o2", "x"], ["y"]),  # skip connection: depth 0 branch
    ], [weight("wq"), weight("wk"), weight("wo")])
    assert onnx_depth(model) == 3


def test_depth_does_not_rely_on_node_order():
    nodes = [
        helper.make_node("MatMul", ["h", "w"], ["y"]),
        helper.make_node("MatMul", ["x", "w"], ["h"]),
    ]
    assert onnx_depth(build(nodes, [weight("w")])) == 2


# ------------------------------------------------------------------------------------ optional dependency


def test_missing_onnxruntime_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(TLCError, match=r"pip install 'tlc\[onnx\]'"):
        export_onnx(Chain(), torch.randn(2, 6), tmp_path / "x.onnx")
    assert list(tmp_path.iterdir()) == []


def test_modules_import_without_onnx():
    code = ("import sys\n"
            "sys.modules['onnx'] = sys.modules['onnxruntime'] = sys.modules['onnxscript'] = None\n"
            "import tlc.measure, tlc.io.export\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
