"""Model zoo: every supported architecture merges exactly, with tiny configs and random BN statistics.

(a) nothing linearized: folding only (policy "never") keeps MACs and depth; the default never adds MACs;
(b) every site linearized: policy "always" gives a strictly shallower exact model, the default policy
    never more MACs than the training form;
(c) a random half of the sites linearized: exact.
"""

from __future__ import annotations

import random

import pytest
import torch
from torch import nn

import tlc
from tlc.measure import count_macs, depth

from .helpers import randomize_bn

TOL = 1e-4


def _tv(name, size=32):
    def build():
        import torchvision

        return getattr(torchvision.models, name)(num_classes=10), torch.randn(2, 3, size, size)

    return build


def _tlc(name, **kwargs):
    def build():
        from tlc.zoo.cifar import ZOO

        return ZOO[name](num_classes=10, **kwargs), torch.randn(2, 3, 32, 32)

    return build


def _timm(name, size=32, **kwargs):
    def build():
        timm = pytest.importorskip("timm")
        return timm.create_model(name, pretrained=False, num_classes=10, **kwargs), torch.randn(2, 3, size, size)

    return build


def _hf(kind):
    def build():
        transformers = pytest.importorskip("transformers")
        config_cls, model_cls = {
            "bert": (transformers.BertConfig, transformers.BertForSequenceClassification),
            "roberta": (transformers.RobertaConfig, transformers.RobertaForSequenceClassification),
        }[kind]
        cfg = config_cls(vocab_size=60, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=48, max_position_embeddings=40, num_labels=3)
        mask = torch.ones(2, 9, dtype=torch.long)
        mask[1, 6:] = 0
        return model_cls(cfg), {"input_ids": torch.randint(4, 60, (2, 9)), "attention_mask": mask}

    return build


ZOO = {
    "torchvision-resnet18": _tv("resnet18"),
    "torchvision-resnet50": _tv("resnet50"),
    "torchvision-mobilenet_v2": _tv("mobilenet_v2"),
    "torchvision-vgg16_bn": _tv("vgg16_bn"),
    "torchvision-swin_t": _tv("swin_t"),
    "tlc-cifar_resnet18": _tlc("cifar_resnet18", width=16),
    "tlc-cifar_mobilenet_v2": _tlc("cifar_mobilenet_v2", width_mult=0.25),
    "tlc-cifar_vgg16_bn": _tlc("cifar_vgg16_bn", width=16),
    "timm-resnet18": _timm("resnet18"),
    "timm-swin": _timm("swin_tiny_patch4_window7_224", img_size=32, patch_size=2, window_size=4, embed_dim=16,
                       depths=(1, 1), num_heads=(1, 2)),
    "hf-bert": _hf("bert"),
    "hf-roberta": _hf("roberta"),
}


@pytest.fixture(scope="module", params=list(ZOO))
def zoo_model(request):
    model, x = ZOO[request.param]()
    return randomize_bn(model).eval(), x


def _call(model: nn.Module, x):
    with torch.no_grad():
        out = model(**x) if isinstance(x, dict) else model(x)
    return out.logits if hasattr(out, "logits") else out


def _assert_exact(reference: nn.Module, deployed: nn.Module, x) -> None:
    a, b = _call(reference, x).double(), _call(deployed, x).double()
    err = ((a - b).abs().max() / a.abs().max().clamp_min(1e-12)).item()
    assert err <= TOL, f"relative error {err:.2e}"


def test_a_nothing_linearized(zoo_model):
    model, x = zoo_model
    folded = tlc.merge(model, x, policy="never")
    _assert_exact(model, folded, x)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in folded.modules())
    assert count_macs(folded, x) == count_macs(model, x)
    assert depth(folded, x) == depth(model, x)
    default = tlc.merge(model, x)
    _assert_exact(model, default, x)
    assert count_macs(default, x) <= count_macs(model, x)


def test_b_every_site_linearized(zoo_model):
    model, x = zoo_model
    sites = tlc.find_sites(model, x)
    assert sites
    shallow = tlc.linearize(model, sites, x, policy="always")
    deployed = tlc.merge(shallow, x)
    _assert_exact(shallow, deployed, x)
    assert depth(deployed, x) < depth(model, x)
    assert tlc.find_sites(deployed, x) == []
    lin = tlc.linearize(model, sites, x)
    default = tlc.merge(lin, x)
    _assert_exact(lin, default, x)
    assert count_macs(default, x) <= count_macs(lin, x)


def test_c_random_half_linearized(zoo_model):
    model, x = zoo_model
    sites = tlc.find_sites(model, x)
    half = random.Random(0).sample(sites, max(1, len(sites) // 2))
    lin = tlc.linearize(model, half, x)
    deployed = tlc.merge(lin, x)
    _assert_exact(lin, deployed, x)
    assert len(tlc.find_sites(deployed, x)) == len(sites) - len(half)
