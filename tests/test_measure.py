"""Counts, latency and comparisons (tlc.measure)."""

from __future__ import annotations

import json
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tlc.errors import SpecError
from tlc.measure import (
    Comparison,
    LatencyStats,
    compare,
    count_macs,
    count_params,
    measure_latency,
    rebatch,
    time_callable,
)

# ---------------------------------------------------------------------------------------------- counts


def two_conv_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1))


def test_conv_net_params_and_macs_by_hand():
    net = two_conv_net()
    # conv1: 8*3*3*3 weights + 8 biases; conv2: 4*8 weights + 4 biases
    assert count_params(net) == (8 * 3 * 9 + 8) + (4 * 8 + 4)
    # one MAC per output element per weight feeding it (biases are not MACs)
    macs = 16 * 16 * 8 * (3 * 3 * 3) + 16 * 16 * 4 * 8
    assert count_macs(net, torch.randn(1, 3, 16, 16)) == macs
    assert count_macs(net, torch.randn(2, 3, 16, 16)) == 2 * macs


def test_linear_chain_macs_per_batch_and_per_sample():
    net = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 5))
    x = torch.randn(4, 10)
    assert count_params(net) == 10 * 20 + 20 + 20 * 5 + 5
    assert count_macs(net, x) == 4 * (10 * 20 + 20 * 5)
    assert count_macs(net, x, per_sample=True) == 10 * 20 + 20 * 5


class SDPAAttention(nn.Module):
    """Multi-head self-attention written with F.scaled_dot_product_attention."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, s, self.heads, d // self.heads).transpose(1, 2)

        y = F.scaled_dot_product_attention(split(self.q(x)), split(self.k(x)), split(self.v(x)))
        return self.o(y.transpose(1, 2).reshape(b, s, d))


def attention_macs(b: int, s: int, d: int, extra: int = 0) -> int:
    """Four d x d projections per token plus q @ k^T and attn @ v over all heads (= b*s*s*d each)."""
    return 4 * b * s * d * d + 2 * b * s * s * d + extra


def test_sdpa_attention_macs_include_both_attention_matmuls():
    b, s, d = 2, 12, 16
    assert count_macs(SDPAAttention(d, heads=4), torch.randn(b, s, d)) == attention_macs(b, s, d)


def test_multihead_attention_fast_path_is_counted_and_flag_restored():
    b, s, d = 2, 12, 16

    class SelfAttention(nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = nn.MultiheadAttention(d, 4, batch_first=True)

        def forward(self, x):
            return self.mha(x, x, x, need_weights=False)[0]

    x = torch.randn(b, s, d)
    assert torch.backends.mha.get_fastpath_enabled()
    assert count_macs(SelfAttention(), x) == attention_macs(b, s, d)
    layer = nn.TransformerEncoderLayer(d, 4, dim_feedforward=24, batch_first=True)
    assert count_macs(layer, x) == attention_macs(b, s, d, extra=2 * b * s * d * 24)
    assert torch.backends.mha.get_fastpath_enabled()


def test_tied_weights_are_counted_once():
    class LM(nn.Module):
        def __init__(self, tie: str):
            super().__init__()
            self.emb = nn.Embedding(50, 8)
            self.head = nn.Linear(8, 50, bias=False)
            if tie == "same":
                self.head.weight = self.emb.weight
            elif tie == "storage":
                self.head.weight = nn.Parameter(self.emb.weight.data)

    assert count_params(LM("none")) == 800
    assert count_params(LM("same")) == 400
    assert count_params(LM("storage")) == 400


def test_count_macs_restores_training_mode():
    net = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5))
    net.train()
    net[1].eval()
    count_macs(net, torch.randn(2, 4))
    assert net.training and net[0].training and not net[1].training


# --------------------------------------------------------------------------------------------- latency


def mlp(width: int = 64) -> nn.Module:
    return nn.Sequential(nn.Linear(32, width), nn.ReLU(), nn.Linear(width, 8))


class KwargsModel(nn.Module):
    """Takes tokenizer-style keyword inputs."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(30, 16)
        self.out = nn.Linear(16, 2)

    def forward(self, input_ids, attention_mask):
        h = self.emb(input_ids) * attention_mask.unsqueeze(-1)
        return self.out(h.sum(1))


def token_inputs(batch: int) -> dict[str, torch.Tensor]:
    return {"input_ids": torch.randint(0, 30, (batch, 6)),
            "attention_mask": torch.ones(batch, 6, dtype=torch.long)}


def test_time_callable_counts_calls_and_measures_the_call():
    calls = []
    samples = time_callable(lambda: (calls.append(1), time.sleep(0.002)), warmup=3, repeats=5, device="cpu")
    assert len(calls) == 8
    assert len(samples) == 5
    assert min(samples) >= 2.0  # sleep never returns early


def test_latency_stats_are_sane():
    stats = measure_latency(mlp(), torch.randn(4, 32), warmup=2, repeats=15)
    assert isinstance(stats, LatencyStats)
    assert 0 < stats.p10_ms <= stats.median_ms <= stats.p90_ms
    assert stats.mean_ms > 0 and stats.std_ms >= 0
    assert (stats.repeats, stats.warmup, stats.batch_size) == (15, 2, 4)
    assert (stats.backend, stats.device, stats.channels_last) == ("eager", "cpu", False)
    assert stats.threads == torch.get_num_threads()
    assert stats.per_sample_ms == pytest.approx(stats.median_ms / 4)
    json.dumps(stats.to_dict())


def test_threads_are_recorded_and_restored():
    before = torch.get_num_threads()
    stats = measure_latency(mlp(), torch.randn(4, 32), warmup=1, repeats=3, threads=1)
    assert stats.threads == 1
    assert torch.get_num_threads() == before


def test_rebatch_tiles_and_slices_every_tensor():
    x = torch.arange(3).view(3, 1)
    assert rebatch(x, 7).flatten().tolist() == [0, 1, 2, 0, 1, 2, 0]
    assert rebatch(x, 2).flatten().tolist() == [0, 1]
    args = rebatch((x, torch.zeros(3, 2), 5), 4)
    assert args[0].shape == (4, 1) and args[1].shape == (4, 2) and args[2] == 5
    tokens = rebatch(token_inputs(2), 5)
    assert {k: tuple(v.shape) for k, v in tokens.items()} == {"input_ids": (5, 6), "attention_mask": (5, 6)}
    with pytest.raises(SpecError):
        rebatch(x, 0)


def test_batch_size_rebatches_tensor_and_dict_inputs():
    assert measure_latency(mlp(), torch.randn(1, 32), batch_size=6, warmup=1, repeats=3).batch_size == 6
    assert measure_latency(KwargsModel(), token_inputs(2), batch_size=5, warmup=1, repeats=3).batch_size == 5


def test_channels_last_runs_and_leaves_the_model_alone():
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
    net.train()
    stats = measure_latency(net, torch.randn(2, 3, 16, 16), channels_last=True, warmup=1, repeats=3)
    assert stats.channels_last
    assert net.training
    assert net[0].weight.is_contiguous()  # the measured copy was converted, not the caller's model


def test_onnxruntime_backend_records_threads():
    pytest.importorskip("onnxruntime")
    stats = measure_latency(mlp(), torch.randn(2, 32), backend="onnxruntime", batch_size=3, threads=1,
                            warmup=2, repeats=5)
    assert (stats.backend, stats.threads, stats.batch_size, stats.repeats) == ("onnxruntime", 1, 3, 5)
    assert stats.p10_ms <= stats.median_ms <= stats.p90_ms


def test_bad_backend_and_options_are_refused():
    x = torch.randn(2, 32)
    with pytest.raises(SpecError):
        measure_latency(mlp(), x, backend="tensorrt", repeats=1)  # type: ignore[arg-type]
    with pytest.raises(SpecError):
        measure_latency(mlp(), x, backend="onnxruntime", channels_last=True)
    if not torch.cuda.is_available():
        with pytest.raises(SpecError):
            measure_latency(mlp(), x, device="cuda", repeats=1)


# --------------------------------------------------------------------------------------------- compare


def expensive() -> nn.Module:
    """Two 256 -> 4096 -> 256 blocks: 4 * 256 * 4096 MACs per sample."""
    return nn.Sequential(
        nn.Linear(256, 4096), nn.ReLU(), nn.Linear(4096, 256), nn.ReLU(),
        nn.Linear(256, 4096), nn.ReLU(), nn.Linear(4096, 256),
    )


def test_compare_ranks_clearly_different_models_consistently():
    """The expensive model does 64x the MACs; measured it must be clearly slower, run after run.

    The magnitude of the ratio depends on the machine's load: the small model's call (~15 us) is mostly
    Python overhead, and a busy neighbour slows the long call more. On 2 cores, 8 runs gave ratios of
    43-47 on a quiet machine and 63-132 beside a busy process (a factor of 2.1 within one condition). The
    test asks for what holds under both: a clear ranking in every run, and runs within a factor of 4.
    """
    torch.manual_seed(0)
    a, b = expensive(), nn.Linear(256, 256)
    x = torch.randn(64, 256)
    runs = [compare(a, b, x, warmup=3, repeats=60, rounds=6, labels=("big", "small")) for _ in range(2)]
    first = runs[0]
    assert first.macs == (64 * 4 * 256 * 4096, 64 * 256 * 256)
    assert first.macs_ratio == 64.0
    assert first.params == (4 * 256 * 4096 + 2 * 4096 + 2 * 256, 256 * 256 + 256)
    ratios = [run.rows[0]["ratio"] for run in runs]
    assert min(ratios) > 8.0
    assert max(ratios) / min(ratios) < 4.0
    row = first.rows[0]
    assert row["a_median_ms"] > row["b_median_ms"]
    assert row["ratio_q1"] <= row["ratio"] <= row["ratio_q3"]
    assert row["timed_calls"] == 60


def test_comparison_rows_table_and_json():
    cmp = compare(mlp(128), mlp(16), torch.randn(2, 32), batch_sizes=(1, 4), warmup=1, repeats=4, rounds=2,
                  labels=("before", "after"))
    assert isinstance(cmp, Comparison)
    assert [(r["backend"], r["batch_size"]) for r in cmp.rows] == [("eager", 1), ("eager", 4)]
    text = str(cmp)
    assert "before" in text and "after" in text and "a/b" in text
    assert len(text.splitlines()) == 6 + len(cmp.rows) + 1
    restored = json.loads(json.dumps(cmp.to_dict()))
    assert restored["macs"] == list(cmp.macs) and len(restored["rows"]) == 2


def test_compare_with_dict_inputs_and_onnxruntime():
    pytest.importorskip("onnxruntime")
    cmp = compare(KwargsModel(), KwargsModel(), token_inputs(2), backends=("eager", "onnxruntime"),
                  batch_sizes=(3,), warmup=1, repeats=4, rounds=2)
    assert [(r["backend"], r["batch_size"]) for r in cmp.rows] == [("eager", 3), ("onnxruntime", 3)]
    assert all(r["ratio"] > 0 for r in cmp.rows)
