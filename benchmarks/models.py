"""The benchmark models, built from a config's ``model`` key (issue 14).

``model`` = ``"mlp"``            :func:`benchmarks.common.build_mlp` (``widths``, ``activation``, …), input (B, 784)
          = ``"examples_mnist"`` pytorch/examples' MNIST ``Net`` as written there (functional forward), input (B, 1, 28, 28)
          = ``"examples_mnist_modules"`` the same net written with modules in an ``nn.Sequential``
          = ``"examples_mnist_logits"`` the same layers without Dropout and LogSoftmax (the logits; every rule trains it)
          = ``"small_cnn"``      a small ReLU CNN every rule can train (no Dropout, no LogSoftmax): see :func:`build_small_cnn`
          = ``"resnet20"``       He et al. 2016's CIFAR ResNet-20 (:class:`ResNet20`), BatchNorm, option-B shortcuts
          = ``"resnet18_tv"``    torchvision's ``resnet18(num_classes=10)`` (:func:`build_resnet18_tv`)
          = ``"vit_tiny"``       a small ViT in plain torch (:class:`TinyViT`): 7×7 patches, class token, learned
                                 positions, 2 pre-LN blocks, attention as explicit matmul + softmax (LFP's rules)

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


def net_logits() -> nn.Sequential:
    """:class:`Net`'s layers as modules without its two Dropouts and its LogSoftmax: the logits, on which the
    cross-entropy equals ``Net``'s ``nll_loss`` of ``log_softmax`` (same layers, same order, the same weights from
    one seed). Every rule trains it: LFP has no rule for LogSoftmax, inference learning needs the logits and
    deterministic maps (``configs/compare_cnn_examples.toml``)."""
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, 1), nn.ReLU(), nn.Conv2d(32, 64, 3, 1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(1), nn.Linear(9216, 128), nn.ReLU(), nn.Linear(128, 10))


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


class TinyViT(nn.Module):
    """A small vision transformer in plain torch (issue 22's benchmarks): a ``patch``×``patch`` stride-``patch``
    convolution embeds the image's patches (28 / 7 = 4 × 4 = 16 tokens of width ``dim``), a learned class token is
    put first and learned positions added, then ``depth`` pre-LayerNorm blocks ``h = h + proj(attn(LN(h)))``,
    ``h = h + fc2(GELU(fc1(LN(h))))``, a final LayerNorm and a Linear head on the class token. The attention is
    written as ``softmax(q kᵀ / √d_h) v`` with ``matmul`` and ``softmax`` rather than
    ``F.scaled_dot_product_attention``: LFP's graph rules cover matmul and softmax (AttnLRP's) and refuse SDPA
    (docs/maths.md §7.2); every other rule sees the same function. Not a ``nn.Sequential``: it is recorded on the
    tape (``FPropagation(model)``). Default widths: dim 32, 2 heads, MLP 64: 19 658 parameters."""

    def __init__(self, in_channels: int = 1, image: int = 28, patch: int = 7, dim: int = 32, depth: int = 2,
                 heads: int = 2, mlp: int = 64, n_classes: int = 10):
        super().__init__()
        if image % patch or dim % heads:
            raise ValueError(f"image {image} must be a multiple of patch {patch} and dim {dim} of heads {heads}")
        tokens = (image // patch) ** 2
        self.heads = heads
        self.embed = nn.Conv2d(in_channels, dim, patch, patch)
        self.cls = nn.Parameter(torch.randn(1, 1, dim) * 0.02)  # not zero: LFP cannot move a zero parameter
        self.pos = nn.Parameter(torch.randn(1, tokens + 1, dim) * 0.02)
        self.blocks = nn.ModuleList(
            nn.ModuleDict(dict(norm1=nn.LayerNorm(dim), qkv=nn.Linear(dim, 3 * dim), proj=nn.Linear(dim, dim),
                               norm2=nn.LayerNorm(dim), fc1=nn.Linear(dim, mlp), fc2=nn.Linear(mlp, dim)))
            for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, n_classes)

    def forward(self, x):
        h = self.embed(x).flatten(2).transpose(1, 2)  # (B, tokens, dim)
        b, n, d = h.shape
        h = torch.cat([self.cls.expand(b, -1, -1), h], dim=1) + self.pos
        n += 1
        for block in self.blocks:
            q, k, v = block["qkv"](block["norm1"](h)).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
            attn = torch.softmax(torch.matmul(q, k.transpose(-2, -1)) * (d // self.heads) ** -0.5, dim=-1)
            a = torch.matmul(attn, v).transpose(1, 2).reshape(b, n, d)
            h = h + block["proj"](a)
            h = h + block["fc2"](F.gelu(block["fc1"](block["norm2"](h))))
        return self.head(self.norm(h)[:, 0])


MODELS = ("mlp", "examples_mnist", "examples_mnist_modules", "examples_mnist_logits", "small_cnn", "resnet20", "resnet18_tv", "vit_tiny")
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
    elif model == "examples_mnist_logits":
        built = net_logits()
    elif model == "resnet20":
        built = ResNet20(in_channels=input_shape(cfg)[0])
    elif model == "resnet18_tv":
        built = build_resnet18_tv(in_channels=input_shape(cfg)[0])
    elif model == "vit_tiny":
        built = TinyViT()
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
    if model == "examples_mnist_logits":
        return ("pytorch/examples' MNIST Net's layers as an nn.Sequential without Dropout and LogSoftmax (the logits; "
                "1199882 parameters)")
    if model == "vit_tiny":
        return (f"a tiny ViT (7×7 patches, class token, learned positions, 2 pre-LN blocks, dim 32, 2 heads, MLP 64, "
                f"explicit matmul + softmax attention; {sum(p.numel() for p in build_model(cfg).parameters())} parameters)")
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
