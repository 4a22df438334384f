"""`tlc compress` -> `tlc.load` -> `tlc export` on a residual net whose branch goes whole.

The branch's first batch norm holds every channel OFF (negative shift), so TLC collapses that site with
every channel removed and the merge turns the whole branch into a bias on the shortcut. The folder the
run wrote must rebuild that deploy form, from a freshly built model (whose bn2 shift is zero where the
fine-tuned one's is not), and export to ONNX.
"""

from __future__ import annotations

import json

import pytest
import torch

import tlc
from tlc.cli import main
from tlc.surgery.modules import ChannelAffine
from tlc.zoo.data import load_data

pytest.importorskip("onnxruntime")

MODEL = '''
import torch
from torch import nn


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.relu1, self.relu2 = nn.ReLU(), nn.ReLU()
        with torch.no_grad():  # every channel of relu1 is off on (almost) every input
            self.bn1.weight.fill_(0.1)
            self.bn1.bias.fill_(-4.0)

    def forward(self, x):
        return self.relu2(x + self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x))))))


def build(num_classes, in_channels):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(in_channels, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), Block(8),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes))
'''


def test_a_branch_removed_whole_loads_and_exports_from_the_cli(tmp_path, capsys):
    model_file = tmp_path / "resnet.py"
    model_file.write_text(MODEL)
    out = tmp_path / "run"
    assert main(["compress", "--model", f"py:{model_file}:build", "--data", "digits", "--out", str(out),
                 "--max-steps", "1", "--finetune-epochs", "1", "--quiet", "--max-acc-drop", "100"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert "3.relu1" in report["sites_collapsed"]
    assert any(r["layer"] == "ChannelAffine" for r in report["merge"])  # the branch became a bias

    loaded = tlc.load(out, trust_code=True)  # the folder names the user's own py: file
    assert any(isinstance(m, ChannelAffine) for m in loaded.modules())
    assert not any(isinstance(m, torch.nn.Conv2d) and m.in_channels == m.out_channels == 8 and m.kernel_size == (3, 3)
                   for m in loaded.modules())  # both convolutions of the branch are gone
    val = load_data("digits", seed=0).val
    correct = sum(int(loaded(x.unsqueeze(0)).argmax()) == int(y) for x, y in val)
    assert correct / len(val) == pytest.approx(report["compressed"]["val_accuracy"], abs=1e-9)

    capsys.readouterr()
    assert main(["export", str(out), "--onnx", "--trust-code"]) == 0
    assert (out / "model.onnx").is_file()
    assert "checked against PyTorch" in capsys.readouterr().out
