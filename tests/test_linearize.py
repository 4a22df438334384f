"""linearize: the training form, masks, padding moves for exact merges, refusals."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import tlc
from tlc.errors import MergeError, TraceError
from tlc.surgery.modules import SiteGate
from tlc.zoo.cifar import cifar_resnet18

from .helpers import randomize_bn, rel_err


class Chain(nn.Module):
    """conv-bn-relu-conv-bn-relu-conv, padded convs: merging after linearizing needs padding moves."""

    def __init__(self):
        super().__init__()
        self.c1, self.b1, self.r1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()
        self.c2, self.b2, self.r2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()
        self.c3 = nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x):
        return self.c3(self.r2(self.b2(self.c2(self.r1(self.b1(self.c1(x)))))))


def _model():
    return randomize_bn(Chain()).eval()


def test_input_model_untouched_and_mode_kept():
    model = _model().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 3, 10, 10)
    lin = tlc.linearize(model, ["r1"], x)
    assert lin.training and model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert isinstance(model.r1, nn.ReLU)
    assert [s.name for s in tlc.find_sites(lin, x)] == ["r2"]


def test_identity_site_matches_manual_linearization_in_the_interior():
    model = _model()
    x = torch.randn(2, 3, 12, 12)
    lin = tlc.linearize(model, ["r1"], x, exact=False)
    manual = model.c3(model.r2(model.b2(model.c2(model.b1(model.c1(x))))))
    assert rel_err(manual, lin(x)) < 1e-6


def test_exact_linearization_moves_padding_and_merges_exactly():
    model = _model()
    x = torch.randn(2, 3, 12, 12)
    lin = tlc.linearize(model, ["r1", "r2"], x, policy="always")
    convs = [m for m in lin.modules() if isinstance(m, nn.Conv2d)]
    assert [c.padding for c in convs] == [(3, 3), (0, 0), (0, 0)]
    # interior values are those of the plainly linearized model; only borders change
    plain = tlc.linearize(model, ["r1", "r2"], x, exact=False)
    assert rel_err(plain(x)[..., 3:-3, 3:-3], lin(x)[..., 3:-3, 3:-3]) < 1e-5
    dep = tlc.merge(lin, x)
    assert rel_err(lin(x), dep(x)) < 1e-5
    assert tlc.measure.depth(dep, x) == 1
    y = torch.randn(1, 3, 20, 17)  # another size: still the same function
    assert rel_err(lin(y), dep(y)) < 1e-5


def test_without_exact_the_padded_segment_is_left_unmerged_but_correct():
    model = _model()
    x = torch.randn(2, 3, 12, 12)
    lin = tlc.linearize(model, ["r1", "r2"], x, exact=False, policy="always")
    dep = tlc.merge(lin, x)
    assert rel_err(lin(x), dep(x)) < 1e-5
    assert tlc.measure.depth(dep, x) == 3


def test_masks_gate_and_remove_channels():
    model = _model()
    x = torch.randn(2, 3, 12, 12)
    mask = torch.tensor([1, 0, 1, 0, 0, 1, 1, 0])
    lin = tlc.linearize(model, ["r1"], x, masks={"r1": mask})
    gate = next(m for m in lin.modules() if isinstance(m, SiteGate))
    assert gate.mask.flatten().tolist() == mask.float().tolist()
    dep = tlc.merge(lin, x, policy="never")
    assert rel_err(lin(x), dep(x)) < 1e-5
    convs = [m for m in dep.modules() if isinstance(m, nn.Conv2d)]
    assert convs[0].out_channels == 4 and convs[1].in_channels == 4


@pytest.mark.parametrize("mask", [[1, 0, 1, 0, 0, 1, 1, 0], [0] * 8], ids=["some-off", "all-off"])
def test_the_savings_estimate_of_a_collapse_is_what_the_merge_removes(mask):
    """The ranking's MACs saving must be the merge's: some channels off are removed; with every channel off,
    what follows is a constant and the layers in front of the site are dropped."""
    from tlc.graph import trace
    from tlc.measure import count_macs
    from tlc.methods.tlc import collapse_savings

    model, x = _model(), torch.randn(2, 3, 12, 12)
    mask = torch.tensor(mask)
    saving = collapse_savings(model, trace(model, x), {"r1": mask}, x, "macs")[("r1",)]
    before = count_macs(tlc.merge(model, x), x)
    after = count_macs(tlc.merge(tlc.linearize(model, ["r1"], x, masks={"r1": mask}), x), x)
    assert saving == pytest.approx((before - after) / before, abs=1e-9)


@pytest.mark.parametrize("masks,match", [
    ({"r1": [1, 0]}, "has 2 entries"),
    ({"r1": [2] * 8}, "only 0 and 1"),
    ({"r2": [1] * 8}, "not linearized"),
])
def test_mask_errors(masks, match):
    with pytest.raises(ValueError, match=match):
        tlc.linearize(_model(), ["r1"], torch.randn(1, 3, 8, 8), masks=masks)


def test_shared_layer_next_to_a_linearized_site_is_refused():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.act = nn.Linear(6, 6), nn.ReLU()

        def forward(self, x):
            return self.fc(self.act(self.fc(x)))

    with pytest.raises(MergeError, match="'fc' is shared"):
        tlc.linearize(Shared(), ["act"], torch.randn(3, 6))


def test_repeated_linearization_accumulates_the_record():
    model = randomize_bn(cifar_resnet18(width=8)).eval()
    x = torch.randn(2, 3, 16, 16)
    sites = tlc.find_sites(model, x)
    lin = tlc.linearize(model, sites[:2], x)
    lin2 = tlc.linearize(lin, [sites[3].name], x, masks={sites[3].name: torch.ones(sites[3].channels)})
    assert lin2._tlc_record["sites"] == [s.name for s in sites[:2]] + [sites[3].name]
    assert len(tlc.find_sites(lin2, x)) == 14
    dep = tlc.merge(lin2, x)
    assert rel_err(lin2(x), dep(x)) < 1e-4


def test_site_names_stay_stable_across_linearizations():
    import torchvision

    model = randomize_bn(torchvision.models.resnet18(num_classes=4)).eval()
    x = torch.randn(1, 3, 32, 32)
    names = [s.name for s in tlc.find_sites(model, x)]
    lin = tlc.linearize(model, ["layer1.0.relu#0", "layer2.1.relu#1"], x)
    remaining = [s.name for s in tlc.find_sites(lin, x)]
    assert remaining == [n for n in names if n not in ("layer1.0.relu#0", "layer2.1.relu#1")]
    lin2 = tlc.linearize(lin, ["layer1.0.relu#1"], x)
    assert "layer1.0.relu#1" not in [s.name for s in tlc.find_sites(lin2, x)]
    dep = tlc.merge(lin2, x)
    assert [s.name for s in tlc.find_sites(dep, x)] == [n for n in remaining if n != "layer1.0.relu#1"]


def test_functional_sites_keep_their_names():
    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 2)

        def forward(self, x):
            return self.c(torch.nn.functional.leaky_relu(self.b(torch.relu(self.a(x))), 0.2))

    model = Functional().eval()
    x = torch.randn(5, 4)
    names = [s.name for s in tlc.find_sites(model, x)]
    lin = tlc.linearize(model, [names[0]], x)
    assert [s.name for s in tlc.find_sites(lin, x)] == names[1:]
    manual = model.c(torch.nn.functional.leaky_relu(model.b(model.a(x)), 0.2))
    assert rel_err(manual, lin(x)) < 1e-6


def test_the_edits_of_a_record_rebuild_the_training_form():
    from tlc.edits import apply_edits, edits_from_record

    model = _model()
    x = torch.randn(2, 3, 12, 12)
    lin = tlc.linearize(model, ["r1"], x, masks={"r1": [1, 1, 0, 1, 0, 1, 1, 1]}, policy="always")
    lin = tlc.linearize(lin, ["r2"], x, policy="always")
    with torch.no_grad():
        for p in lin.parameters():
            p.add_(0.01 * torch.randn_like(p))  # "fine-tuned"
    rebuilt, _ = apply_edits(_model(), edits_from_record(lin._tlc_record), x)
    rebuilt.load_state_dict(lin.state_dict())
    assert rel_err(lin(x), rebuilt(x)) < 1e-6
    assert [m.padding for m in rebuilt.modules() if isinstance(m, nn.Conv2d)] == \
        [m.padding for m in lin.modules() if isinstance(m, nn.Conv2d)]


def test_a_functional_site_in_an_export_only_model_is_refused_with_where_it_is():
    class ExportOnly(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x):
            h = torch.nn.functional.relu(self.fc1(x))
            return self.fc2(h[..., : int(x.shape[-1])])  # int() of a shape: torch.fx cannot trace this

    model, x = ExportOnly(), torch.randn(3, 4)
    assert tlc.trace(model, x).backend == "export"
    assert tlc.find_sites(model, x) == []  # not offered: tlc cannot address it
    (site,) = tlc.trace(model, x).unaddressable
    with pytest.raises(TraceError, match=r"in the forward of ExportOnly\) is a functional activation"):
        tlc.linearize(model, [site], x)
