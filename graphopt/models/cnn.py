"""Small CNNs written in the project (no torchvision): ResNet-style and DenseNet-style."""
from __future__ import annotations

import torch
from torch import nn


class BasicBlock(nn.Module):
    """conv-bn-relu-conv-bn plus a (projected) residual, then relu."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return torch.relu(y + self.shortcut(x))


class SmallResNet(nn.Module):
    def __init__(self, widths=(16, 32, 64), num_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU())
        blocks, cin = [], widths[0]
        for i, w in enumerate(widths):
            blocks += [BasicBlock(cin, w, 1 if i == 0 else 2), BasicBlock(w, w)]
            cin = w
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = self.blocks(self.stem(x))
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


class DenseLayer(nn.Module):
    def __init__(self, cin: int, growth: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(cin)
        self.conv = nn.Conv2d(cin, growth, 3, 1, 1, bias=False)

    def forward(self, x):
        return torch.cat([x, self.conv(torch.relu(self.bn(x)))], dim=1)


class SmallDenseNet(nn.Module):
    def __init__(self, growth: int = 12, layers_per_block: int = 4, num_classes: int = 10):
        super().__init__()
        c = 2 * growth
        self.stem = nn.Conv2d(3, c, 3, 1, 1, bias=False)
        stages = []
        for b in range(2):
            for _ in range(layers_per_block):
                stages.append(DenseLayer(c, growth))
                c += growth
            if b == 0:
                stages += [nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, c // 2, 1, bias=False), nn.AvgPool2d(2)]
                c //= 2
        self.features = nn.Sequential(*stages)
        self.norm = nn.BatchNorm2d(c)
        self.head = nn.Linear(c, num_classes)

    def forward(self, x):
        x = torch.relu(self.norm(self.features(self.stem(x))))
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def dense_net_16() -> SmallDenseNet:
    """A DenseNet whose every layer adds 16 channels and whose stem and transition are
    multiples of 16: the widths ONNX Runtime's blocked kernels want (benchmarks use 6 layers)."""
    return SmallDenseNet(growth=16, layers_per_block=4)


CNNS = {"resnet": SmallResNet, "densenet": SmallDenseNet, "densenet16": dense_net_16}


def randomise_batchnorm(model: nn.Module, generator: torch.Generator) -> None:
    """Fresh BatchNorm statistics are identity-like; give them real values so folding is tested."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=generator) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=generator) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=generator) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=generator) * 0.1)


def load(name: str, seed: int = 0):
    from . import ModelBundle
    torch.manual_seed(seed)
    model = CNNS[name]().eval()
    with torch.no_grad():
        randomise_batchnorm(model, torch.Generator().manual_seed(seed))
    return ModelBundle(name, model, None, make_images, f"{type(model).__name__} with random weights",
                       is_sequence_model=False)


def make_images(batch: int = 1, size: int = 32, seed: int = 0) -> tuple[torch.Tensor]:
    """Example inputs of the image models: one [batch, 3, size, size] tensor."""
    return (torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed)),)
