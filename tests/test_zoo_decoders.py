"""The Hugging Face models users reach for first, from tiny configs: DistilBERT, GPT-2 (classifier and LM
head) and a Llama-style decoder (gated MLP) trace, offer their sites, and merge exactly.

DistilBERT's classifier calls an ``nn.ReLU()`` created in forward: tlc cannot address it, keeps it and
compresses the rest. GPT-2 returns a key/value cache and builds its MLP from ``Conv1D``; Llama's SiLU is a
gate (``down(silu(gate(x)) * up(x))``): not offered, linearizable by name, and the product stays.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest
import torch
from torch import nn

import tlc
from tlc.errors import TraceError
from tlc.measure import count_macs, depth
from tlc.ops import Kind

from .helpers import rel_err

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

TOL = 1e-4


def _inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 6:] = 0
    return {"input_ids": torch.randint(4, 60, (2, 9), generator=g), "attention_mask": mask}


def _build(name: str) -> nn.Module:
    t = transformers
    torch.manual_seed(0)
    if name == "distilbert":
        return t.DistilBertForSequenceClassification(t.DistilBertConfig(
            vocab_size=60, dim=16, n_layers=2, n_heads=2, hidden_dim=48, max_position_embeddings=40, num_labels=3))
    gpt2 = dict(vocab_size=60, n_embd=16, n_layer=2, n_head=2, n_positions=32, bos_token_id=1, eos_token_id=2)
    if name == "gpt2-cls":
        return t.GPT2ForSequenceClassification(t.GPT2Config(**gpt2, pad_token_id=0, num_labels=3))
    if name == "gpt2-lm":
        return t.GPT2LMHeadModel(t.GPT2Config(**gpt2))
    return t.LlamaForCausalLM(t.LlamaConfig(vocab_size=60, hidden_size=16, intermediate_size=48, num_hidden_layers=2,
                                            num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32))


# per model: the sites offered, the gated ones (not offered, linearizable by name), the unaddressable ones
EXPECTED = {
    "distilbert": ([f"distilbert.transformer.layer.{i}.ffn.activation" for i in (0, 1)], [], ["relu"]),
    "gpt2-cls": ([f"transformer.h.{i}.mlp.act" for i in (0, 1)], [], []),
    "gpt2-lm": ([f"transformer.h.{i}.mlp.act" for i in (0, 1)], [], []),
    "llama": ([], [f"model.layers.{i}.mlp.act_fn" for i in (0, 1)], []),
}


@dataclass
class Compressed:
    """A zoo model traced, a random half of its sites linearized, and its deploy form."""

    name: str
    model: nn.Module
    x: dict
    graph: tlc.Graph
    half: list[tlc.Site]
    lin: nn.Module
    deployed: nn.Module


@pytest.fixture(scope="module", params=list(EXPECTED))
def zoo(request) -> Compressed:
    model, x = _build(request.param).eval(), _inputs()
    graph = tlc.trace(model, x)
    pool = graph.sites or [s for s in graph.all_sites if s.addressable]  # llama: its gates, asked for by name
    half = random.Random(0).sample(pool, max(1, len(pool) // 2))
    lin = tlc.linearize(model, half, x)
    return Compressed(request.param, model, x, graph, half, lin, tlc.merge(lin, x))


def _logits(model: nn.Module, x: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**x).logits


def _activation_modules(model: nn.Module) -> set[str]:
    """Paths of the model's activation modules: torch's and transformers' own."""
    from transformers import activations

    torch_types = (nn.ReLU, nn.GELU, nn.SiLU)
    return {name for name, m in model.named_modules()
            if isinstance(m, torch_types) or type(m).__module__ == activations.__name__}


def test_every_addressable_site_is_offered_and_the_others_say_why(zoo):
    graph = zoo.graph
    offered, gated, unaddressable = EXPECTED[zoo.name]
    assert [s.name for s in graph.sites] == offered
    assert [s.name for s in graph.excluded if s.gated] == gated
    assert [s.name for s in graph.unaddressable] == unaddressable
    assert {s.module for s in graph.all_sites if s.addressable} == _activation_modules(zoo.model)
    assert all(s.reason for s in graph.excluded) and not any(s.reason for s in graph.sites)
    assert all("product of two linear maps" in s.reason for s in graph.excluded if s.gated)


def test_random_half_linearized_merges_exactly(zoo):
    assert rel_err(_logits(zoo.lin, zoo.x), _logits(zoo.deployed, zoo.x)) <= TOL
    assert rel_err(_logits(zoo.model, zoo.x), _logits(zoo.lin, zoo.x)) > 1e-4  # the half is really linear
    assert len(tlc.trace(zoo.deployed, zoo.x).all_sites) == len(zoo.graph.all_sites) - len(zoo.half)


def test_distilbert_keeps_its_inline_relu_and_compresses_the_rest():
    model, x = _build("distilbert").eval(), _inputs()
    with pytest.raises(TraceError, match=r"cannot linearize site relu: it \(in the forward of "
                                         r"DistilBertForSequenceClassification\) is a functional activation"):
        tlc.linearize(model, ["relu"], x)
    lin = tlc.linearize(model, tlc.find_sites(model, x), x)
    deployed = tlc.merge(lin, x)
    assert rel_err(_logits(lin, x), _logits(deployed, x)) <= TOL
    assert depth(deployed, x) < depth(model, x)
    # the deploy form is a graph, edited node by node: there the relu can be addressed
    (relu,) = tlc.find_sites(deployed, x)
    second = tlc.linearize(deployed, [relu], x)
    again = tlc.merge(second, x)
    assert tlc.trace(again, x).all_sites == []
    assert rel_err(_logits(second, x), _logits(again, x)) <= TOL


@pytest.mark.parametrize("zoo", ["gpt2-cls", "gpt2-lm"], indirect=True)
def test_gpt2_conv1d_mlp_collapses_into_one_linear(zoo):
    assert zoo.model.config.use_cache  # traced without its key/value cache, the model keeps it
    linears = {zoo.graph.info[n].owner for n in zoo.graph.nodes if zoo.graph.info[n].kind is Kind.LINEAR}
    assert {f"transformer.h.{i}.mlp.{c}.weight" for i in (0, 1) for c in ("c_fc", "c_proj")} <= linears
    (site,) = zoo.half
    block = site.name.removesuffix(".act")
    (merged,) = [r for r in zoo.deployed.tlc_report.records if r.weight_ops == 2]
    assert merged.layer == "Linear(16->16)"
    assert [p for p in merged.replaces if "weight" in p] == [f"linear({block}.c_fc.weight)",
                                                            f"linear({block}.c_proj.weight)"]
    assert depth(zoo.deployed, zoo.x) < depth(zoo.model, zoo.x)
    assert count_macs(zoo.deployed, zoo.x) < count_macs(zoo.model, zoo.x)


@pytest.mark.parametrize("zoo", ["llama"], indirect=True)
def test_llama_gated_silu_linearized_keeps_the_product_and_exports_to_onnx(zoo, tmp_path):
    pytest.importorskip("onnxruntime")
    from tlc.io.export import export_onnx, onnxruntime_session, session_feed

    assert tlc.find_sites(zoo.model, zoo.x) == [] and [s.gated for s in zoo.half] == [True]
    assert zoo.deployed.tlc_report.records == []  # gate(x) * up(x) is no linear map: nothing merges
    linear = torch.ops.aten.linear.default
    products = [n for n in zoo.deployed.graph.nodes if n.target is torch.ops.aten.mul.Tensor
                and all(isinstance(a, torch.fx.Node) and a.target is linear for a in n.args)]
    assert len(products) == 1  # the linearized gate's product stays
    assert count_macs(zoo.deployed, zoo.x) == count_macs(zoo.model, zoo.x)
    path = export_onnx(zoo.deployed, zoo.x, tmp_path / "llama.onnx")
    session = onnxruntime_session(path, device="cpu", threads=2)
    got = torch.from_numpy(session.run(None, session_feed(session, zoo.x))[0])
    assert rel_err(_logits(zoo.deployed, zoo.x), got) <= TOL


def test_conv1d_is_a_linear_layer_for_torch_fx_too():
    from transformers.activations import NewGELUActivation
    from transformers.pytorch_utils import Conv1D

    model = nn.Sequential(Conv1D(12, 6), NewGELUActivation(), Conv1D(6, 12)).eval()
    x = torch.randn(2, 5, 6)
    graph = tlc.trace(model, x)
    assert graph.backend == "fx" and [s.name for s in graph.sites] == ["1"]
    assert [graph.info[n].kind for n in graph.nodes if n.op == "call_module"] == [Kind.LINEAR, Kind.SITE, Kind.LINEAR]
    lin = tlc.linearize(model, graph.sites, x)
    deployed = tlc.merge(lin, x)
    assert [r.layer for r in deployed.tlc_report.records] == ["Linear(6->6)"]
    assert rel_err(lin(x), deployed(x)) <= TOL
