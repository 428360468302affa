"""torchvision's 22 classification families on the tape (issue 21; docs/maths.md §7.1): one small member of each,
``get_model(name, weights=None, num_classes=10)``, float64, train mode, a cross-entropy step through
``FPropagation(model, graph=True)`` against ``loss.backward()`` from the same weights: every ``.grad`` ≤ 1e-10
relative to the larger of its own largest entry and 1e-5 of the model's largest gradient, BatchNorm statistics
identical. (§7 says 1e-8; MaxViT's ``pre_norm.bias`` before a train-mode BatchNorm has an analytically zero
gradient where both sides return rounding noise of ~2e-16 of the model's scale, 2.4e-8 against a 1e-8 floor.) Dropout and stochastic depth at p = 0 for the comparison, and once with dropout on under a
shared seed. The fast members run in the default suite, the rest with ``-m slow``.
"""
import copy

import pytest
import torch
import torch.nn.functional as F

import torch_fadjoint as tfa

torchvision = pytest.importorskip("torchvision")

# name: (input size, slow)
FAMILIES = {
    "alexnet": (64, True), "vgg11_bn": (32, True), "resnet18": (32, False), "resnet50": (32, True),
    "resnext50_32x4d": (32, True), "wide_resnet50_2": (32, True), "densenet121": (32, True),
    "squeezenet1_1": (64, False), "googlenet": (32, False), "inception_v3": (75, True), "mobilenet_v2": (32, True),
    "mobilenet_v3_small": (32, True), "mnasnet0_5": (32, True), "shufflenet_v2_x0_5": (32, True),
    "efficientnet_b0": (32, True), "efficientnet_v2_s": (32, True), "regnet_x_400mf": (32, True),
    "regnet_y_400mf": (32, False), "convnext_tiny": (32, True), "vit_b_32": (224, True), "swin_t": (64, True), "maxvit_t": (224, True),
}


def _model(name: str, dropout: float | None = 0.0):
    kwargs = dict(weights=None, num_classes=10)
    if name in ("googlenet", "inception_v3"):
        kwargs.update(aux_logits=False, init_weights=False)
    if name.startswith("vit"):
        kwargs.update(image_size=FAMILIES[name][0])
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, **kwargs).double().train()
    if dropout is not None:
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout) or type(module).__name__ == "StochasticDepth":
                module.p = dropout
    return model


def _exact(model, size: int, seed: int = 0):
    reference = copy.deepcopy(model)
    x, t = torch.randn(2, 3, size, size, dtype=torch.float64), torch.tensor([1, 7])
    torch.manual_seed(seed)
    with torch.enable_grad():
        F.cross_entropy(reference(x), t).backward()  # the autograd reference
    net = tfa.FPropagation(model, graph=True)
    torch.manual_seed(seed)
    net(x)
    net.backward(F.cross_entropy, t)
    want = {n: p.grad for n, p in reference.named_parameters() if p.grad is not None}
    scale = max(g.abs().max().item() for g in want.values())
    assert scale > 1e-6
    worst = 0.0
    for name, p in model.named_parameters():
        g = want.get(name)
        if g is None:
            assert p.grad is None, name
            continue
        worst = max(worst, ((p.grad - g).abs().max() / max(g.abs().max().item(), 1e-5 * scale)).item())
    assert worst <= 1e-10, worst
    for (name, b), c in zip(model.named_buffers(), reference.buffers()):
        assert torch.equal(b, c), f"{name} differs from autograd's run"


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if slow else n
                                  for n, (_, slow) in FAMILIES.items()])
def test_family_equals_autograd(name):
    _exact(_model(name), FAMILIES[name][0])


def test_dropout_on_under_a_shared_seed_equals_autograd():
    """SqueezeNet's classifier Dropout(p=0.5): the tape draws the mask torch's own call draws."""
    _exact(_model("squeezenet1_1", dropout=None), 64, seed=3)
