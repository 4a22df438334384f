"""The measured latency table: keys, the on-disk cache, the fit, whole-model predictions, refusals."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from tlc.errors import SpecError, TLCError
from tlc.measure import LatencyTable, LayerShape
from tlc.measure.latency import measure_latency
from tlc.surgery import affine

BUDGET = 0.05  # seconds per measured shape: enough for these small layers, keeps the file fast


def table(tmp_path, **kwargs) -> LatencyTable:
    return LatencyTable(cache_dir=tmp_path, threads=1, budget_s=BUDGET, **kwargs)


def conv(c: int, size: int, out: int, k: int = 3) -> LayerShape:
    return LayerShape("conv", (c, size, size), out, kernel=(k, k), padding=(k // 2, k // 2))


def test_keys_are_stable_and_round_trip():
    a = LayerShape("conv", (64, 56, 56), 64, kernel=(3, 3), padding=(1, 1))
    b = LayerShape("conv", [64, 56, 56], 64, kernel=[3, 3], stride=(1, 1), padding=(1, 1), dilation=(1, 1))
    assert a.key() == b.key() == "conv|64x56x56|64|1|3x3|1x1|1x1|1x1|1|"
    assert a == b and hash(a) == hash(b)
    shapes = [a, LayerShape("dense", (7, 128), 10, bias=False), LayerShape("affine", (32, 8, 8), bias=False),
              LayerShape("add", (16, 4)), LayerShape("act", (16, 4, 4), op="hardswish"),
              LayerShape("conv", (8, 100), 16, groups=4, kernel=(5,), stride=(2,), dilation=(2,))]
    for s in shapes:
        assert LayerShape.from_key(s.key()) == s
    assert len({s.key() for s in shapes}) == len(shapes)
    assert LayerShape("act", (4,), op="relu", bias=False).key() == LayerShape("act", (4,), op="relu").key()


def test_sizes_and_shapes_are_derived():
    s = LayerShape("conv", (16, 32, 32), 32, kernel=(3, 3), stride=(2, 2), padding=(1, 1))
    assert s.output_shape() == (32, 16, 16)
    assert s.macs(2) == 2 * 32 * 16 * 9 * 16 * 16
    assert LayerShape("dense", (5, 8), 3).macs() == 5 * 8 * 3
    assert LayerShape("add", (4, 4)).macs() == 0
    assert LayerShape("add", (4, 4)).bytes_moved() == 4 * 3 * 16


@pytest.mark.parametrize("kwargs", [
    dict(kind="pool", input=(3, 8, 8)),
    dict(kind="conv", input=(3, 8, 8), out_channels=4),  # no kernel
    dict(kind="conv", input=(3, 8, 8), out_channels=4, groups=2, kernel=(3, 3)),
    dict(kind="conv", input=(3, 2, 2), out_channels=4, kernel=(5, 5)),  # empty output
    dict(kind="dense", input=(8,)),
    dict(kind="act", input=(8,), op="softmax"),
    dict(kind="affine", input=(8,), out_channels=8),
])
def test_malformed_shapes_are_refused(kwargs):
    with pytest.raises(SpecError):
        LayerShape(**kwargs)


def test_shape_of_a_merged_map():
    m = affine.identity_map("conv", 16, 2, numeric=False)
    m = affine.apply_conv(m, torch.empty(32, 16, 3, 3), None, (2, 2), (1, 1), (1, 1), 1, numeric=False)
    s = LayerShape.from_map(m, (16, 32, 32))
    assert s == LayerShape("conv", (16, 32, 32), 32, kernel=(3, 3), stride=(2, 2), padding=(1, 1), bias=False)
    assert LayerShape.from_map(affine.identity_map("dense", 8, 0, numeric=False), (8,)) is None


def test_cache_is_reused_by_a_second_table(tmp_path):
    shapes = [conv(8, 16, 8), conv(16, 16, 16, k=1), LayerShape("act", (8, 16, 16), op="relu")]
    first = table(tmp_path)
    assert first.prefetch(shapes + shapes[:1], progress=False) == 3
    assert first.path.is_file() and first.path.parent == tmp_path
    second = table(tmp_path)
    assert second.path == first.path
    assert second.prefetch(shapes, progress=False) == 0
    assert [second.seconds(s) for s in shapes] == [first.seconds(s) for s in shapes]
    other = table(tmp_path, batch_size=2)
    assert other.path != first.path and len(other) == 0


def test_bigger_conv_is_slower_and_fit_is_sane(tmp_path):
    t = table(tmp_path)
    small, big = conv(8, 16, 8), conv(32, 32, 32)
    assert big.macs() >= 50 * small.macs()
    assert t.seconds(big) > t.seconds(small)
    t.calibrate()
    overhead = t.overhead_seconds
    convs = [v for k, v in t._entries.items() if k.startswith("conv|")]
    assert 0 <= overhead <= min(convs)
    assert t.estimate(small) == t.seconds(small)  # measured shapes are not re-estimated
    unseen = conv(24, 24, 48)
    assert unseen not in t
    assert overhead <= t.estimate(unseen) < math.inf and unseen not in t


def test_corrupt_or_foreign_cache_is_ignored_with_a_warning(tmp_path):
    t = table(tmp_path)
    t.path.parent.mkdir(parents=True, exist_ok=True)
    t.path.write_bytes(b"\x00not json{")
    with pytest.warns(UserWarning, match="ignoring latency cache"):
        assert len(table(tmp_path)) == 0
    t.path.write_text(json.dumps({"format": 1, "conditions": {**t.conditions, "threads": 99}, "entries": {}}))
    with pytest.warns(UserWarning, match="other conditions"):
        assert len(table(tmp_path)) == 0
    good = conv(8, 8, 8).key()
    entries = {good: 1e-5, conv(8, 8, 16).key(): float("nan"), conv(8, 8, 4).key(): -1.0, "__import__('os')": 1.0,
               conv(4, 8, 4).key(): "1e-5", conv(4, 8, 8).key(): True}
    t.path.write_text(json.dumps({"format": 1, "conditions": t.conditions, "entries": entries}))
    with pytest.warns(UserWarning, match="ignored 5 malformed entries"):
        loaded = table(tmp_path)
    assert len(loaded) == 1 and loaded.seconds(conv(8, 8, 8)) == 1e-5


def test_onnxruntime_backend_measures_a_conv(tmp_path):
    pytest.importorskip("onnxruntime")
    t = table(tmp_path, backend="onnxruntime")
    assert t.conditions["onnxruntime"] and "onnxruntime" in t.path.name
    assert 0 < t.seconds(conv(8, 16, 8)) < 1
    assert table(tmp_path, backend="onnxruntime").prefetch([conv(8, 16, 8)], progress=False) == 0


def test_predict_is_close_to_measured_latency(tmp_path):
    net = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    ).eval()
    x = torch.randn(1, 3, 32, 32)
    predicted = table(tmp_path).predict(net, x)
    measured = measure_latency(net, x, threads=1, warmup=5, repeats=30).median_ms / 1e3
    assert measured / 3 < predicted < measured * 3


def test_a_prediction_anchored_on_a_measured_reference_scales_by_the_table_ratio(tmp_path):
    wide = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1)).eval()
    narrow = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 32, 3, padding=1)).eval()
    x = torch.randn(1, 3, 16, 16)
    t = table(tmp_path)
    alone = {name: t.predict(m, x) for name, m in (("wide", wide), ("narrow", narrow))}
    assert alone["narrow"] < alone["wide"]
    assert t.predict(wide, x, reference=(wide, 0.01)) == pytest.approx(0.01)
    anchored = t.predict(narrow, x, reference=(wide, 0.01))
    assert anchored == pytest.approx(0.01 * alone["narrow"] / alone["wide"])
    for bad in (0.0, -1.0, float("nan"), "1"):
        with pytest.raises(TLCError, match="reference seconds"):
            t.predict(narrow, x, reference=(wide, bad))


def test_oversized_layers_are_refused_before_allocation(tmp_path):
    t = table(tmp_path)
    huge = LayerShape("dense", (1 << 15,), 1 << 14)
    with pytest.raises(TLCError, match="elements"):
        t.seconds(huge)
    with pytest.raises(TLCError, match="elements"):
        t.prefetch([conv(8, 8, 8), LayerShape("act", (1 << 20, 1 << 9), op="relu")], progress=False)
    assert len(t) == 0


def test_bad_options_are_refused(tmp_path):
    with pytest.raises(SpecError):
        LatencyTable(backend="tensorrt", cache_dir=tmp_path)
    with pytest.raises(SpecError):
        LatencyTable(batch_size=0, cache_dir=tmp_path)
    with pytest.raises(SpecError):
        LatencyTable(device="meta", cache_dir=tmp_path)


def test_overhead_falls_back_to_the_fastest_entry_with_few_points(tmp_path, monkeypatch):
    monkeypatch.setattr("tlc.measure.table.CALIBRATION", ())
    t = table(tmp_path)
    with pytest.raises(TLCError, match="no entries"):
        t.estimate(conv(8, 8, 8))
    fastest = min(t.seconds(conv(8, 16, 8)), t.seconds(LayerShape("act", (8, 16, 16), op="relu")))
    assert t.overhead_seconds == fastest


def test_saving_keeps_entries_another_table_wrote(tmp_path):
    a, b = table(tmp_path), table(tmp_path)
    a.seconds(conv(8, 8, 8))
    b.seconds(conv(8, 8, 16))
    assert len(table(tmp_path)) == 2
