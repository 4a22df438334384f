"""Deploy forms of zoo models exported to ONNX: ONNX Runtime matches PyTorch and the ONNX graph has the
depth tlc.measure reports."""

from __future__ import annotations

import pytest
import torch

import tlc
from tlc.io.export import export_onnx, onnx_depth, onnxruntime_session, session_feed

from .helpers import randomize_bn
from .test_zoo_merge import ZOO

pytest.importorskip("onnxruntime")


@pytest.mark.parametrize("name", ["tlc-cifar_resnet18", "tlc-cifar_mobilenet_v2", "torchvision-swin_t", "hf-bert"])
def test_merged_zoo_model_round_trips_through_onnx(name, tmp_path):
    model, x = ZOO[name]()
    model = randomize_bn(model).eval()
    sites = tlc.find_sites(model, x)
    deployed = tlc.merge(tlc.linearize(model, sites, x, policy="always"), x)
    path = export_onnx(deployed, x, tmp_path / "model.onnx")
    session = onnxruntime_session(path, device="cpu", threads=2)
    got = torch.from_numpy(session.run(None, session_feed(session, x))[0])
    with torch.no_grad():
        out = deployed(**x) if isinstance(x, dict) else deployed(x)
    ref = out.logits if hasattr(out, "logits") else out
    assert ((ref - got).abs().max() / ref.abs().max()).item() < 1e-4
    assert onnx_depth(path) == tlc.measure.depth(deployed, x)
