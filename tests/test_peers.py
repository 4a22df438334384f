"""The Torch-Pruning width baseline: pruning to a MAC target, fine-tuning, saving and rebuilding."""

from __future__ import annotations

import copy
import json
import sys

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

pytest.importorskip("torch_pruning", reason="the width baseline needs the optional package torch-pruning")

from tlc.errors import TLCError  # noqa: E402
from tlc.measure import count_macs  # noqa: E402
from tlc.run import peers  # noqa: E402
from tlc.run.peers import STEPS, WidthJob, prune_to_macs, require_torch_pruning, run_width_baseline  # noqa: E402
from tlc.train import FitConfig  # noqa: E402
from tlc.zoo.cifar import cifar_resnet18, tiny_cnn  # noqa: E402

from .helpers import randomize_bn, same_weights  # noqa: E402

X = torch.randn(2, 3, 8, 8)


def _data(n: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 3, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g))


def _calibration() -> list:
    data = _data(16, 3)
    return [(data.tensors[0][i:i + 8], data.tensors[1][i:i + 8]) for i in (0, 8)]


def _job(model: nn.Module, target: int, **changes) -> WidthJob:
    fields = dict(model=model, train_data=_data(32, 1), val_data=_data(16, 2), test_data=_data(16, 4),
                  collate_fn=None, example_inputs=X, calibration=_calibration(),
                  finetune=FitConfig(epochs=2, batch_size=16, lr=0.01), target_macs=target, progress=False,
                  log=lambda line: None)
    return WidthJob(**{**fields, **changes})


@pytest.mark.parametrize("build", [tiny_cnn, lambda: cifar_resnet18(width=8)], ids=["tiny_cnn", "cifar_resnet18"])
def test_pruned_to_the_target_and_still_runs(build):
    model = randomize_bn(build()).eval()
    before = copy.deepcopy(model)
    base = count_macs(model, X[:1])
    pruned, info = prune_to_macs(model, X, base // 2)
    assert info["reached"] and info["macs"] <= base // 2 and 0 < info["rounds"] < STEPS
    assert info["macs"] == count_macs(pruned, X[:1]) and info["macs"] > base // 4  # small steps: not far below
    assert info["params"] < sum(p.numel() for p in model.parameters())
    assert pruned(X).shape == model(X).shape
    assert same_weights(model, before)  # the input model is untouched
    assert [m.weight.shape for m in model.modules() if isinstance(m, nn.Conv2d)] == \
        [m.weight.shape for m in before.modules() if isinstance(m, nn.Conv2d)]


class _TinyViT(nn.Module):
    """Patch embedding, one pre-norm block with nn.MultiheadAttention (3 heads) and an MLP, head."""

    def __init__(self, dim: int = 48):
        super().__init__()
        self.embed = nn.Conv2d(1, dim, 4, 4)
        self.norm1, self.attn = nn.LayerNorm(dim), nn.MultiheadAttention(dim, 3, batch_first=True)
        self.norm2, self.mlp = nn.LayerNorm(dim), nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(),
                                                                nn.Linear(2 * dim, dim))
        self.head = nn.Linear(dim, 10)

    def forward(self, x):
        x = self.embed(x).flatten(2).transpose(1, 2)
        y = self.norm1(x)
        x = x + self.attn(y, y, y, need_weights=False)[0]
        x = x + self.mlp(self.norm2(x))
        return self.head(x.mean(1))


def test_attention_widths_stay_divisible_by_the_heads():
    torch.manual_seed(0)
    model, x = _TinyViT().eval(), torch.randn(2, 1, 16, 16)
    target = count_macs(model, x[:1]) // 2
    pruned, info = prune_to_macs(model, x, target)
    assert info["reached"] and info["macs"] <= target and pruned(x).shape == (2, 10)
    assert pruned.attn.embed_dim % 3 == 0 and pruned.attn.embed_dim < 48


def test_hugging_face_attention_keeps_its_heads_and_reshapes_by_the_pruned_head_width():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=100, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=96, max_position_embeddings=32, num_labels=2)
    model = transformers.BertForSequenceClassification(config).eval()
    x = {"input_ids": torch.randint(0, 100, (2, 16)), "attention_mask": torch.ones(2, 16, dtype=torch.long)}
    target = int(0.7 * count_macs(model, {k: v[:1] for k, v in x.items()}))
    pruned, info = prune_to_macs(model, x, target)
    assert info["reached"] and info["macs"] <= target
    for layer in pruned.bert.encoder.layer:
        attention = layer.attention.self
        assert attention.num_attention_heads == 4 and attention.query.out_features < 48
        assert attention.query.out_features == attention.key.out_features == attention.value.out_features
        assert attention.attention_head_size * 4 == attention.query.out_features == attention.all_head_size
    assert pruned(**x).logits.shape == (2, 2)
    replayed, again = prune_to_macs(model, x, target, rounds=info["rounds"])
    assert again["macs"] == info["macs"]


def test_swin_prunes_through_its_patch_merging():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, num_classes=10, img_size=16,
                              patch_size=2, window_size=4, embed_dim=16, depths=(1, 1), num_heads=(2, 4),
                              in_chans=1).eval()
    x = torch.randn(2, 1, 16, 16)
    target = int(0.7 * count_macs(model, x[:1]))
    pruned, info = prune_to_macs(model, x, target)
    assert info["reached"] and pruned(x).shape == (2, 10)
    merging = pruned.layers[1].downsample
    assert merging.norm.normalized_shape[0] == merging.reduction.in_features < 64


def test_timm_vit_attention_reshapes_by_the_pruned_head_width():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=32, patch_size=8,
                              embed_dim=48, depth=2, num_heads=3, in_chans=1).eval()
    x = torch.randn(2, 1, 32, 32)
    pruned, info = prune_to_macs(model, x, int(0.6 * count_macs(model, x[:1])))
    attention = pruned.blocks[0].attn
    assert info["reached"] and pruned(x).shape == (2, 10) and attention.num_heads == 3
    assert attention.qkv.out_features == 3 * attention.attn_dim == 9 * attention.head_dim < 3 * 48


def test_patch_merging_pruner_removes_the_four_copies_of_a_channel():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    merging = timm.models.swin_transformer.PatchMerging(dim=6, out_dim=8).eval()
    with torch.no_grad():
        merging.norm.weight.uniform_(0.5, 1.5)
        merging.norm.bias.uniform_(-0.5, 0.5)
    x = torch.randn(2, 4, 4, 6)
    keep, drop = [0, 2, 3, 5], [1, 4]
    features = x.reshape(2, 2, 2, 2, 2, 6).permute(0, 1, 3, 4, 2, 5).flatten(3)  # PatchMerging's own layout
    kept = [k * 6 + c for k in range(4) for c in keep]
    expected = nn.functional.linear(
        nn.functional.layer_norm(features[..., kept], (len(kept),), merging.norm.weight[kept],
                                 merging.norm.bias[kept], merging.norm.eps),
        merging.reduction.weight[:, kept], merging.reduction.bias)
    tp = require_torch_pruning()
    pruner = peers._customized_pruners(tp, merging)[type(merging)]
    pruner.prune_in_channels(merging, drop)
    assert pruner.get_in_channels(merging) == 4
    with torch.no_grad():
        assert torch.allclose(merging(x[..., keep]), expected, atol=1e-6)


def test_replaying_the_rounds_gives_the_same_architecture():
    model = randomize_bn(tiny_cnn()).eval()
    base = count_macs(model, X[:1])
    pruned, info = prune_to_macs(model, X, base // 3, importance="taylor", calibration=_calibration())
    replayed, again = prune_to_macs(model, X, base // 3, rounds=info["rounds"])
    assert again["rounds"] == info["rounds"] and again["macs"] == info["macs"]
    shapes = [{k: v.shape for k, v in m.state_dict().items()} for m in (replayed, pruned)]
    assert shapes[0] == shapes[1]
    unpruned, none = prune_to_macs(model, X, 0, rounds=0)
    assert none["rounds"] == 0 and not none["reached"] and same_weights(unpruned, model)


def test_taylor_uses_the_calibration_gradients():
    model = randomize_bn(tiny_cnn()).eval()
    base = count_macs(model, X[:1])
    magnitude, _ = prune_to_macs(model, X, base // 2)
    taylor, info = prune_to_macs(model, X, base // 2, importance="taylor", calibration=_calibration())
    assert info["importance"] == "taylor" and info["reached"] and taylor(X).shape == (2, 10)
    assert all(p.grad is None for p in taylor.parameters()) and all(p.grad is None for p in model.parameters())
    kept = [(m.weight.shape, m.weight) for m in (magnitude.conv1, taylor.conv1)]
    assert kept[0][0] == kept[1][0] and not torch.equal(kept[0][1], kept[1][1])  # same shapes, other channels
    with pytest.raises(TLCError, match="calibration"):
        prune_to_macs(model, X, base // 2, importance="taylor")


def test_an_unreachable_target_is_reported_not_looped_on():
    model = tiny_cnn(width=128).eval()  # the last step asks for all of conv3's 256 channels: some stay
    pruned, info = prune_to_macs(model, X, 1)
    assert not info["reached"] and info["rounds"] == STEPS and info["macs"] > 1
    assert pruned(X).shape == (2, 10) and pruned.conv3.out_channels >= 1 and pruned.conv1.out_channels >= 1


@pytest.mark.filterwarnings("ignore:Unwrapped parameters detected")
def test_bad_arguments_and_unprunable_models_are_one_line_errors():
    with pytest.raises(TLCError, match="importance='random'"):
        prune_to_macs(tiny_cnn(), X, 10, importance="random")
    with pytest.raises(TLCError, match="target_macs"):
        prune_to_macs(tiny_cnn(), X, -1)
    with pytest.raises(TLCError, match="unknown width baseline 'nope'"):
        run_width_baseline("nope", _job(tiny_cnn(), 10), None)

    class NoLayers(nn.Module):
        def forward(self, x):
            return x.mean((2, 3))

    class Scrambled(nn.Module):  # a hand-written weight and a channel permutation Torch-Pruning cannot follow
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3)
            self.mix = nn.Parameter(torch.randn(8, 8))
            self.fc = nn.Linear(8, 4)

        def forward(self, x):
            y = self.conv(x).mean((2, 3))
            return self.fc(y @ self.mix + y.flip(1).reshape(-1, 2, 4).transpose(1, 2).reshape(-1, 8))

    for model, expected in ((NoLayers(), "NoLayers has no convolution"), (Scrambled(), "left Scrambled unable to run")):
        with pytest.raises(TLCError, match=expected) as caught:
            prune_to_macs(model, X, 10)
        assert "\n" not in str(caught.value)


def test_missing_package_message(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "torch_pruning", None)
    with pytest.raises(TLCError) as caught:
        require_torch_pruning()
    assert str(caught.value) == ("the torch-pruning baseline needs the optional package torch-pruning: "
                                 "pip install 'tlc[peers]'")
    with pytest.raises(TLCError, match="pip install"):
        run_width_baseline("torch-pruning", _job(tiny_cnn(), 10), tmp_path)


def test_baseline_saves_then_rebuilds_without_training(tmp_path, monkeypatch):
    model = randomize_bn(tiny_cnn()).eval()
    before = copy.deepcopy(model)
    job = _job(model, count_macs(model, X[:1]) // 2)
    trained, record = run_width_baseline("torch-pruning", job, tmp_path)
    assert same_weights(model, before)
    assert {p.name for p in tmp_path.iterdir()} == {"weights.safetensors", "baseline.json"}  # checkpoints gone
    assert json.loads((tmp_path / "baseline.json").read_text()) == record
    assert record["name"] == "torch-pruning" and record["method"] == "torch-pruning"
    assert record["importance"] == "magnitude" and record["reached"] and record["macs"] <= job.target_macs
    assert record["finetune_epochs"] == 2 and 0 <= record["val_accuracy"] <= 1 and record["test_accuracy"] is not None
    assert record["depth"] == 4 and record["activations"] == 3 and record["torch_pruning"]
    assert record["macs"] == count_macs(trained, X[:1])
    assert not same_weights(trained, prune_to_macs(model, X, 0, rounds=record["rounds"])[0])  # fine-tuned

    def no_training(*args, **kwargs):
        raise AssertionError("the saved baseline was trained again")

    monkeypatch.setattr(peers, "fit", no_training)
    rebuilt, again = run_width_baseline("torch-pruning", job, tmp_path)
    assert again == record and same_weights(rebuilt, trained)
    assert torch.equal(rebuilt(X), trained(X))

    with pytest.raises(TLCError, match="remove the folder"):
        run_width_baseline("torch-pruning", _job(model, job.target_macs - 1), tmp_path)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "weights.safetensors"))
    with pytest.raises(TLCError, match="does not fit the replayed pruned model"):
        run_width_baseline("torch-pruning", job, tmp_path)


def test_a_killed_baseline_continues_its_fine_tuning(tmp_path, monkeypatch):
    model = randomize_bn(tiny_cnn()).eval()
    job = _job(model, count_macs(model, X[:1]) // 2, test_data=None)
    uninterrupted, record = run_width_baseline("torch-pruning-taylor", job, tmp_path / "a")
    assert record["importance"] == "taylor" and record["test_accuracy"] is None

    real_evaluate, runs = peers.evaluate, []

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    def recorded(*args, **kwargs):
        runs.append(real_fit(*args, **kwargs))
        return runs[-1]

    monkeypatch.setattr(peers, "evaluate", killed)
    with pytest.raises(KeyboardInterrupt):
        run_width_baseline("torch-pruning-taylor", job, tmp_path / "b")
    assert (tmp_path / "b" / "fit").is_dir() and not (tmp_path / "b" / "baseline.json").exists()
    real_fit = peers.fit
    monkeypatch.setattr(peers, "evaluate", real_evaluate)
    monkeypatch.setattr(peers, "fit", recorded)
    resumed, again = run_width_baseline("torch-pruning-taylor", job, tmp_path / "b")
    assert runs[0].resumed_from is not None  # the fine-tuning continued from its checkpoint
    assert same_weights(resumed, uninterrupted)
    assert {k: v for k, v in again.items() if k != "wall_time_s"} == \
        {k: v for k, v in record.items() if k != "wall_time_s"}
