"""torchvision ResNet / ResNeXt bodies returning C2..C5, trained as mmdetection's PAA config does.

mmdetection's ResNet (pytorch style) has torchvision's parameter names, so checkpoints of either
load without renaming. ``norm_eval``: every BatchNorm stays in eval mode (running statistics never
update) while the affine weights of unfrozen stages still train, which FrozenBatchNorm2d cannot do.
"""
from __future__ import annotations

from torch import Tensor, nn
from torchvision.models import resnet


def _resnext101_32x4d() -> resnet.ResNet:
    # torchvision ships 32x8d and 64x4d; 32x4d is the same family with width_per_group=4.
    return resnet.ResNet(resnet.Bottleneck, [3, 4, 23, 3], groups=32, width_per_group=4)


_BUILDERS = {
    "resnet18": resnet.resnet18,
    "resnet34": resnet.resnet34,
    "resnet50": resnet.resnet50,
    "resnet101": resnet.resnet101,
    "resnext101_32x4d": _resnext101_32x4d,
    "resnext101_64x4d": resnet.resnext101_64x4d,
}


class ResNetBody(nn.Module):
    """The convolutional body of a torchvision ResNet (no pooling, no fc)."""

    def __init__(self, name: str, frozen_stages: int = 1, norm_eval: bool = True) -> None:
        super().__init__()
        if name not in _BUILDERS:
            raise ValueError(f"unknown backbone {name!r}; choose one of {', '.join(_BUILDERS)}")
        net = _BUILDERS[name]()
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        expansion = 4 if isinstance(net.layer1[0], resnet.Bottleneck) else 1
        self.out_channels = [64 * expansion, 128 * expansion, 256 * expansion, 512 * expansion]
        self.frozen_stages = frozen_stages
        self.norm_eval = norm_eval
        self._freeze()

    def _freeze(self) -> None:
        frozen = [self.conv1, self.bn1] if self.frozen_stages >= 0 else []
        frozen += [getattr(self, f"layer{i}") for i in range(1, self.frozen_stages + 1)]
        for module in frozen:
            for p in module.parameters():
                p.requires_grad_(False)

    def train(self, mode: bool = True) -> "ResNetBody":
        super().train(mode)
        frozen = {id(m) for i in range(1, self.frozen_stages + 1) for m in getattr(self, f"layer{i}").modules()}
        frozen |= {id(self.bn1)} if self.frozen_stages >= 0 else set()
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d) and (self.norm_eval or id(m) in frozen):
                m.eval()  # norm_eval: BN statistics are those of the pretrained model, always
        return self

    def forward(self, x: Tensor) -> list[Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        c2 = self.layer1(x)
        c3 = self.layer2(c2)
        c4 = self.layer3(c3)
        c5 = self.layer4(c4)
        return [c2, c3, c4, c5]
