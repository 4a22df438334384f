"""Every zoo model's deploy form survives save -> load -> ONNX with the outputs it had.

Random channel masks of every kind (all off, all on, mixed, none) are put on the sites, so residual
branches become biases, channels are removed and activations linearized; the architecture is then
rebuilt from a *freshly initialised* model, whose weights (and so the zeros the merge sees) differ from
the saved ones: the structure must come from the recipe, not from the new model's values.
"""

from __future__ import annotations

import random

import pytest
import torch

import tlc
from tlc.io.export import export_onnx, onnxruntime_session, session_feed

from .helpers import randomize_bn, rel_err
from .test_zoo_merge import ZOO, _call

KINDS = ("off", "on", "mixed", "identity")


def random_masks(sites, seed: int) -> dict[str, torch.Tensor | None]:
    """A mask of each kind at least once (sites permitting), the rest drawn at random."""
    rng = random.Random(seed)
    kinds = [KINDS[i % len(KINDS)] for i in range(len(sites))]
    rng.shuffle(kinds)
    masks = {}
    for site, kind in zip(sites, kinds):
        if kind == "off":
            masks[site.name] = torch.zeros(site.channels)
        elif kind == "on":
            masks[site.name] = torch.ones(site.channels)
        elif kind == "mixed":
            masks[site.name] = (torch.rand(site.channels, generator=torch.Generator().manual_seed(seed)) < 0.5).float()
        else:
            masks[site.name] = None
    return masks


@pytest.mark.parametrize("name", list(ZOO))
def test_deploy_form_round_trips_through_save_load_and_onnx(name, tmp_path):
    model, x = ZOO[name]()
    model = randomize_bn(model).eval()
    sites = tlc.find_sites(model, x)
    masks = random_masks(sites, seed=len(name))
    chosen = [s for s in sites if s.name in masks]
    lin = tlc.linearize(model, chosen, x, {k: v for k, v in masks.items() if v is not None})
    deployed = tlc.merge(lin, x)
    tlc.save(deployed, tmp_path / "run", example_inputs=x)

    fresh, _ = ZOO[name]()
    loaded = tlc.load(tmp_path / "run", model=fresh)
    expected = _call(deployed, x)
    assert rel_err(expected, _call(loaded, x)) <= 1e-6
    assert sorted(loaded.state_dict()) == sorted(deployed.state_dict())

    path = export_onnx(loaded, x, tmp_path / "model.onnx")
    session = onnxruntime_session(path, threads=1)
    got = torch.from_numpy(session.run(None, session_feed(session, x))[0])
    assert rel_err(expected, got) <= 1e-4
