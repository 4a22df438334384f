"""CIFAR-style networks for 32x32 inputs, with a width knob for tiny test configurations.

These are the architectures of the TLC paper's CIFAR-10 experiments. Every activation *call* is its own
non-in-place module, so one module is one site and hooks see the pre-activation tensor unchanged:
ResNet-18 has 17 sites, MobileNetV2 35, VGG-16-bn 15. All are traceable by ``torch.fx.symbolic_trace``.

Minimum input size: ResNet-18, MobileNetV2 and the tiny CNN work at any size from 8x8 up (adaptive
pooling); VGG-16-bn halves the map five times and needs at least 32x32.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from tlc.errors import SpecError

VGG16_CONFIG: tuple[int | str, ...] = (
    64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M",
)  # fmt: skip
CIFAR_MOBILENET_V2_SETTING: list[list[int]] = [
    [1, 16, 1, 1],
    [6, 24, 2, 1],
    [6, 32, 3, 2],
    [6, 64, 4, 2],
    [6, 96, 3, 1],
    [6, 160, 3, 2],
    [6, 320, 1, 1],
]


def _require_positive(name: str, value: object, kind: type | tuple[type, ...] = int) -> None:
    """Refuse a size argument that is not a positive number of the expected kind, in one line."""
    if isinstance(value, bool) or not isinstance(value, kind) or value <= 0:
        expected = "integer" if kind is int else "number"
        raise SpecError(f"{name} must be a positive {expected}, got {value!r}")


def _check_counts(num_classes: int, in_channels: int) -> None:
    """Validate the arguments every builder takes."""
    _require_positive("num_classes", num_classes)
    _require_positive("in_channels", in_channels)


def _init_weights(model: nn.Module) -> None:
    """Deterministic torchvision-style init: kaiming (fan_out) convs, BN 1/0, linear N(0, 0.01)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.01)
            nn.init.zeros_(m.bias)


def _conv_bn(
    in_channels: int, out_channels: int, kernel_size: int, stride: int = 1
) -> tuple[nn.Conv2d, nn.BatchNorm2d]:
    """A bias-free 'same' convolution followed by its BatchNorm."""
    conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2, bias=False)
    return conv, nn.BatchNorm2d(out_channels)


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 conv-BN, a residual add, two separate ReLU modules."""

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = _conv_bn(in_planes, planes, 3, stride)
        self.relu1 = nn.ReLU()
        self.conv2, self.bn2 = _conv_bn(planes, planes, 3)
        if stride != 1 or in_planes != planes:
            self.shortcut: nn.Module = nn.Sequential(*_conv_bn(in_planes, planes, 1, stride))
        else:
            self.shortcut = nn.Identity()
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = out + self.shortcut(x)
        return self.relu2(out)


class CifarResNet18(nn.Module):
    """ResNet-18 for 32x32 inputs: 3x3 stride-1 stem, no max-pool, 4 stages of 2 basic blocks."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: int = 64) -> None:
        super().__init__()
        self.conv1, self.bn1 = _conv_bn(in_channels, width, 3)
        self.relu = nn.ReLU()
        widths = [width, 2 * width, 4 * width, 8 * width]
        strides = [1, 2, 2, 2]
        in_planes = width
        for index, (planes, stride) in enumerate(zip(widths, strides), start=1):
            blocks = [BasicBlock(in_planes, planes, stride), BasicBlock(planes, planes, 1)]
            self.add_module(f"layer{index}", nn.Sequential(*blocks))
            in_planes = planes
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8 * width, num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


class CifarVGG16BN(nn.Module):
    """VGG-16 with BatchNorm for 32x32 inputs (minimum size 32x32: five 2x2 max-pools).

    Convolutions keep their bias, as torchvision's ``vgg16_bn`` does; BN folding absorbs it.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: int = 64) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for item in VGG16_CONFIG:
            if isinstance(item, str):
                layers.append(nn.MaxPool2d(2, 2))
                continue
            out_channels = item * width // 64
            conv = nn.Conv2d(channels, out_channels, 3, padding=1)
            layers += [conv, nn.BatchNorm2d(out_channels), nn.ReLU()]
            channels = out_channels
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        hidden = 8 * width
        self.classifier = nn.Sequential(
            nn.Linear(channels, hidden),
            nn.ReLU(),
            nn.Dropout(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Dropout(),
            nn.Linear(hidden, num_classes),
        )
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self.avgpool(self.features(x)), 1)
        return self.classifier(x)


class TinyCNN(nn.Module):
    """A three-site demo network with one residual add: fast enough for unit tests of every transform."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: int = 8) -> None:
        super().__init__()
        self.conv1, self.bn1 = _conv_bn(in_channels, width, 3)
        self.relu1 = nn.ReLU()
        self.conv2, self.bn2 = _conv_bn(width, width, 3)
        self.relu2 = nn.ReLU()
        self.conv3, self.bn3 = _conv_bn(width, 2 * width, 3, 2)
        self.relu3 = nn.ReLU()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.relu2(self.bn2(self.conv2(x)) + x)
        x = self.relu3(self.bn3(self.conv3(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def cifar_resnet18(num_classes: int = 10, in_channels: int = 3, width: int = 64) -> nn.Module:
    """ResNet-18 for CIFAR (17 ReLU sites); stage widths width, 2w, 4w, 8w."""
    _check_counts(num_classes, in_channels)
    _require_positive("width", width)
    return CifarResNet18(num_classes, in_channels, width)


def cifar_vgg16_bn(num_classes: int = 10, in_channels: int = 3, width: int = 64) -> nn.Module:
    """VGG-16-bn for CIFAR (15 ReLU sites); channels scaled by width/64; inputs of at least 32x32."""
    _check_counts(num_classes, in_channels)
    _require_positive("width", width)
    return CifarVGG16BN(num_classes, in_channels, width)


def cifar_mobilenet_v2(num_classes: int = 10, in_channels: int = 3, width_mult: float = 1.0) -> nn.Module:
    """torchvision's MobileNetV2 with the CIFAR changes (35 ReLU6 sites).

    The stem convolution has stride 1 and the second stage stride 1, so a 32x32 input ends at 4x4.
    Activations are made non-in-place so each site's input stays readable by hooks.
    """
    from torchvision.models import MobileNetV2

    _check_counts(num_classes, in_channels)
    _require_positive("width_mult", width_mult, (int, float))
    model = MobileNetV2(
        num_classes=num_classes, width_mult=width_mult, inverted_residual_setting=CIFAR_MOBILENET_V2_SETTING
    )
    stem = model.features[0][0]
    new_stem = nn.Conv2d(in_channels, stem.out_channels, 3, stride=1, padding=1, bias=False)
    nn.init.kaiming_normal_(new_stem.weight, mode="fan_out")
    model.features[0][0] = new_stem
    for module in model.modules():
        if isinstance(module, nn.ReLU6):
            module.inplace = False
    return model


def tiny_cnn(num_classes: int = 10, in_channels: int = 3, width: int = 8) -> nn.Module:
    """Three conv-BN-ReLU sites (one behind a residual add) and a linear head; any input size."""
    _check_counts(num_classes, in_channels)
    _require_positive("width", width)
    return TinyCNN(num_classes, in_channels, width)


ZOO: dict[str, Callable[..., nn.Module]] = {
    "cifar_resnet18": cifar_resnet18,
    "cifar_mobilenet_v2": cifar_mobilenet_v2,
    "cifar_vgg16_bn": cifar_vgg16_bn,
    "tiny_cnn": tiny_cnn,
}
