"""Helpers shared by the tests."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
from torch import nn


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every batch norm non-trivial statistics and affine parameters, so folding is really tested."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
                if m.affine:
                    m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                    m.bias.copy_(torch.rand(n, generator=g) - 0.5)
    return model


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).abs().max() / a.abs().max().clamp_min(1e-12)).item()


def weight_layers(model: nn.Module) -> int:
    """Convolutions and linear layers in ``model`` (what a merge folds together)."""
    return sum(isinstance(m, nn.Conv2d | nn.Linear) for m in model.modules())


@contextmanager
def second_fine_tuning_interrupted(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The compression run inside the block is interrupted (KeyboardInterrupt) when its second fine-tuning
    starts, as a user's Ctrl-C would; the block must end with that interruption."""
    import tlc.run.loop as engine

    real_fit, calls = engine.fit, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_fit(*args, **kwargs)

    monkeypatch.setattr(engine, "fit", interrupted)
    try:
        with pytest.raises(KeyboardInterrupt):
            yield
    finally:
        monkeypatch.setattr(engine, "fit", real_fit)


def same_weights(a: nn.Module, b: nn.Module) -> bool:
    """Bit-identical state dicts, names included."""
    sa, sb = a.state_dict(), b.state_dict()
    return list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


def digit_subsets(train: int, val: int, image_size: int = 8):
    """(bundle, first ``train`` training samples, first ``val`` validation samples) of sklearn's digits."""
    from torch.utils.data import Subset

    from tlc.zoo.data import load_data

    data = load_data("digits", seed=0, image_size=image_size)
    return data, Subset(data.train, range(train)), Subset(data.val, range(val))


def trained_briefly(model: nn.Module, train, epochs: float = 4) -> nn.Module:
    """``model`` after a few epochs of AdamW on ``train`` (fit's own seed), in eval mode: a toy base to compress."""
    import tlc
    from tlc.train import FitConfig

    tlc.train.fit(model, train, FitConfig(epochs=epochs, lr=1e-2, optimizer="adamw", batch_size=16, weight_decay=0.0),
                  progress=False)
    return model.eval()


def compress_on_digits(method: str, settings: dict, trained: nn.Module, digits, out, preset: str = "default",
                       resume: bool = False, **overrides):
    """``tlc.compress`` of ``trained`` with ``method`` on a digits bundle (see :func:`digit_subsets`): the
    method tests' end-to-end run, ``settings`` (their fast ones) replaced by ``overrides``."""
    import tlc

    data, train, val = digits
    return tlc.compress(trained, train, val, method=method, preset=preset, **{**settings, **overrides},
                        example_inputs=data.example_inputs(2), out_dir=out, resume=resume, progress=False, log=None)
