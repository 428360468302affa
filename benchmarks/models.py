"""The benchmark models, built from a config's ``model`` key (issue 14).

``model`` = ``"mlp"``            :func:`benchmarks.common.build_mlp` (``widths``, ``activation``, …), input (B, 784)
          = ``"examples_mnist"`` pytorch/examples' MNIST ``Net`` as written there (functional forward), input (B, 1, 28, 28)
          = ``"examples_mnist_modules"`` the same net written with modules in an ``nn.Sequential``
          = ``"small_cnn"``      a small ReLU CNN every rule can train (no Dropout, no LogSoftmax): see :func:`build_small_cnn`
          = ``"resnet20"``       He et al. 2016's CIFAR ResNet-20 (:class:`ResNet20`), BatchNorm, option-B shortcuts
          = ``"resnet18_tv"``    torchvision's ``resnet18(num_classes=10)`` (:func:`build_resnet18_tv`)

The two ResNets read their input channels from :func:`input_shape`: ``image_shape`` when set (the speed configs'
random input), else the data set's (1 × 28 × 28 for MNIST and Fashion-MNIST, 3 × 32 × 32 for CIFAR-10). They
train only through ``FPropagation(model, graph=True)`` (the config key ``graph = true``, ``benchmarks/rules.py``):
the chain recorder cannot follow their residual additions.

``dropout = false`` sets every Dropout's ``p`` to 0 (the identity; nothing is drawn or recorded): the
F-adjoint's per-step losses then equal autograd's, while with dropout on the two draw different masks
(the recorder draws its own, ``torch_fadjoint.maps._Dropout``).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

import torch_fadjoint as tfa

from .common import ACTIVATIONS, build_mlp

IMAGE_SHAPE = (1, 28, 28)


# pytorch/examples, mnist/main.py (BSD 3-Clause, Copyright (c) 2017 PyTorch contributors), commit
# 77f55b912142e11fcfdf5b530231fb9c52f181e8: the class as written there, unchanged.
class Net(nn.Module):
    def __init__(self):
        super(Net, self).__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, 1)
        self.conv2 = nn.Conv2d(32, 64, 3, 1)
        self.dropout1 = nn.Dropout(0.25)
        self.dropout2 = nn.Dropout(0.5)
        self.fc1 = nn.Linear(9216, 128)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x):
        x = self.conv1(x)
        x = F.relu(x)
        x = self.conv2(x)
        x = F.relu(x)
        x = F.max_pool2d(x, 2)
        x = self.dropout1(x)
        x = torch.flatten(x, 1)
        x = self.fc1(x)
        x = F.relu(x)
        x = self.dropout2(x)
        x = self.fc2(x)
        output = F.log_softmax(x, dim=1)
        return output


def net_modules() -> nn.Sequential:
    """:class:`Net` written with modules only (same layers, same order, same initialisation from one seed):
    the recorder runs it without its function mode (the baseline of the functional-forward overhead)."""
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, 1), nn.ReLU(), nn.Conv2d(32, 64, 3, 1), nn.ReLU(), nn.MaxPool2d(2), nn.Dropout(0.25),
        nn.Flatten(1), nn.Linear(9216, 128), nn.ReLU(), nn.Dropout(0.5), nn.Linear(128, 10), nn.LogSoftmax(dim=1))


POOLS = {"max": nn.MaxPool2d, "avg": nn.AvgPool2d, "none": None, "": None}


def build_small_cnn(channels: list[int], kernels: list[int], strides: list[int], pools: list[str],
                    hidden: list[int], activation: str = "relu", input_noise: float = 0.0,
                    n_classes: int = 10) -> nn.Sequential:
    """Conv2d(c_{i-1}, c_i, kernels[i], strides[i], padding kernels[i] // 2) → activation → pools[i] (2×2) per
    block, then Flatten and Linear layers through ``hidden`` to ``n_classes`` (activation between, none
    after the last). ``input_noise`` puts a ``tfa.nn.InputNoise`` before every parametric layer (LFP's
    Step nets, as :func:`build_mlp`)."""
    if not len(channels) == len(kernels) == len(strides) == len(pools):
        raise SystemExit(f"error: channels, kernels, strides and pools must have one entry per conv block, got "
                         f"{channels}, {kernels}, {strides}, {pools}")
    if activation not in ACTIVATIONS or ACTIVATIONS[activation] is None:
        raise SystemExit(f"error: activation must be one of {sorted(k for k, v in ACTIVATIONS.items() if v)}")
    unknown = [p for p in pools if p not in POOLS]
    if unknown:
        raise SystemExit(f"error: pools must be among {sorted(k for k in POOLS if k)}, got {unknown}")
    layers: list[nn.Module] = []
    c, side = IMAGE_SHAPE[0], IMAGE_SHAPE[1]
    for c_out, k, s, pool in zip(channels, kernels, strides, pools):
        if input_noise:
            layers.append(tfa.nn.InputNoise(input_noise))
        layers += [nn.Conv2d(c, c_out, k, s, padding=k // 2), ACTIVATIONS[activation]()]
        side = (side + 2 * (k // 2) - k) // s + 1
        if POOLS[pool] is not None:
            layers.append(POOLS[pool](2))
            side //= 2
        c = c_out
    layers.append(nn.Flatten())
    widths = [c * side * side, *hidden, n_classes]
    for i, (n_in, n_out) in enumerate(zip(widths[:-1], widths[1:])):
        if input_noise:
            layers.append(tfa.nn.InputNoise(input_noise))
        layers.append(nn.Linear(n_in, n_out))
        if i < len(widths) - 2:
            layers.append(ACTIVATIONS[activation]())
    return nn.Sequential(*layers)


class BasicBlock(nn.Module):
    """conv3×3(stride) → BN → ReLU → conv3×3 → BN, plus the shortcut, then ReLU (He et al. 2016, §4.2). The shortcut
    is the identity where the shape is kept, else option B: a 1×1 convolution with the block's stride and BN."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Identity() if stride == 1 and c_in == c_out else nn.Sequential(
            nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = out + self.shortcut(x)
        return F.relu(out)


class ResNet20(nn.Module):
    """He et al. 2016's CIFAR ResNet (§4.2) with n = 3: conv3×3(16) → BN → ReLU, three stages of ``n`` BasicBlocks
    at 16 / 32 / 64 channels (the first block of stages 2 and 3 has stride 2 and an option-B 1×1-conv shortcut),
    global average pooling and a Linear head: 6n + 2 = 20 weighted layers (plus the two shortcut convolutions).
    ``in_channels``: 1 for MNIST / Fashion-MNIST (28 × 28 → 14 → 7), 3 for CIFAR-10 (32 → 16 → 8).
    torch's default initialisation (the paper's He-normal init is not needed for the comparison)."""

    def __init__(self, in_channels: int = 3, n_classes: int = 10, blocks: int = 3, widths=(16, 32, 64)):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        stages, c = [], widths[0]
        for i, width in enumerate(widths):
            layers = []
            for j in range(blocks):
                layers.append(BasicBlock(c, width, 2 if (i > 0 and j == 0) else 1))
                c = width
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3 = stages
        self.fc = nn.Linear(c, n_classes)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.fc(out)


def build_resnet18_tv(in_channels: int = 3, n_classes: int = 10) -> nn.Module:
    """torchvision's ``resnet18(num_classes=n_classes)`` as torchvision builds it (7×7 stride-2 stem, max pool,
    ImageNet layout: on 32 × 32 inputs the last stage runs at 1 × 1). For ``in_channels != 3`` its ``conv1`` is
    replaced by ``nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)`` (torch's default init, drawn after the rest)."""
    from torchvision.models import resnet18

    model = resnet18(num_classes=n_classes)
    if in_channels != 3:
        model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    return model


MODELS = ("mlp", "examples_mnist", "examples_mnist_modules", "small_cnn", "resnet20", "resnet18_tv")
RESNETS = ("resnet20", "resnet18_tv")
# one image of each data set (C, H, W); the MNIST-like sets are IMAGE_SHAPE
DATASET_SHAPES = {"cifar10": (3, 32, 32), "cifar_10": (3, 32, 32)}


def input_shape(cfg: dict) -> tuple[int, ...]:
    """The shape of one input of ``cfg``'s model: (784,) for the MLP, (1, 28, 28) for the MNIST CNNs; the ResNets
    take ``image_shape`` when set, else the data set's (CIFAR-10: (3, 32, 32))."""
    model = cfg.get("model", "mlp")
    if model not in MODELS:
        raise SystemExit(f"error: model must be one of {list(MODELS)}, got {model!r}")
    if model == "mlp":
        return (cfg["widths"][0],)
    if model in RESNETS:
        if cfg.get("image_shape"):
            if len(cfg["image_shape"]) != 3:
                raise SystemExit(f"error: image_shape must be [channels, height, width], got {cfg['image_shape']}")
            return tuple(int(c) for c in cfg["image_shape"])
        return DATASET_SHAPES.get(str(cfg.get("dataset", "mnist")).lower().replace("-", "_"), IMAGE_SHAPE)
    return IMAGE_SHAPE


def build_model(cfg: dict) -> nn.Module:
    """The model named by ``cfg["model"]`` (default ``"mlp"``), with ``dropout = false`` applied."""
    model = cfg.get("model", "mlp")
    input_shape(cfg)  # checks the name
    if model == "mlp":
        built = build_mlp(cfg["widths"], cfg["activation"], cfg.get("output_activation", ""), cfg.get("init", "default"),
                          cfg.get("input_noise", 0.0))
    elif model == "examples_mnist":
        built = Net()
    elif model == "examples_mnist_modules":
        built = net_modules()
    elif model == "resnet20":
        built = ResNet20(in_channels=input_shape(cfg)[0])
    elif model == "resnet18_tv":
        built = build_resnet18_tv(in_channels=input_shape(cfg)[0])
    else:
        built = build_small_cnn(cfg["channels"], cfg["kernels"], cfg["strides"], cfg["pools"], cfg["hidden"],
                                cfg["activation"], cfg.get("input_noise", 0.0))
    if not cfg.get("dropout", True):
        for module in built.modules():
            if isinstance(module, (nn.Dropout, nn.Dropout1d, nn.Dropout2d)):
                module.p = 0.0
    return built


def describe(cfg: dict) -> str:
    """One line naming ``cfg``'s model, for reports: "784x256x256x10 MLP", the small CNN's layers, …"""
    model = cfg.get("model", "mlp")
    if model == "mlp":
        return f"{'x'.join(map(str, cfg['widths']))} MLP"
    if model == "examples_mnist":
        return "pytorch/examples' MNIST Net (functional forward)"
    if model == "examples_mnist_modules":
        return "pytorch/examples' MNIST Net written with modules (nn.Sequential)"
    if model in RESNETS:
        c = input_shape(cfg)[0]
        name = "ResNet-20 (He et al. 2016, option-B shortcuts)" if model == "resnet20" else \
            "torchvision resnet18(num_classes=10)" + ("" if c == 3 else f" with a {c}-channel conv1")
        return f"{name}, {c}-channel input ({sum(p.numel() for p in build_model(cfg).parameters())} parameters)"
    parts = []
    for m in build_model({**cfg, "input_noise": 0.0}):
        if isinstance(m, nn.Conv2d):
            parts.append(f"Conv2d({m.in_channels}→{m.out_channels}, {m.kernel_size[0]}×{m.kernel_size[1]}, "
                         f"stride {m.stride[0]}, pad {m.padding[0]})")
        elif isinstance(m, nn.Linear):
            parts.append(f"Linear({m.in_features}→{m.out_features})")
        elif isinstance(m, (nn.MaxPool2d, nn.AvgPool2d)):
            parts.append(f"{type(m).__name__}(2)")
        else:
            parts.append(type(m).__name__)
    return "small CNN " + " · ".join(parts) + f" ({sum(p.numel() for p in build_model(cfg).parameters())} parameters)"
