"""tests/state.py, the snapshot every "refused before anything is written" test relies on: it sees each kind
of change, names it, and takes NaN that was there as unchanged."""
import pytest
import torch
from torch import nn

from .state import assert_untouched, changes, snapshot


def _stepped():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(5, 3, dtype=torch.float64)).square().sum().backward()
    opt.step()
    return model, opt


def test_nothing_changed_passes_nan_included():
    model, opt = _stepped()
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    opt.state[model[0].weight]["momentum_buffer"][1, 1] = float("nan")
    before = snapshot(model, opt, grad_identity=True, versions=True)
    assert_untouched(before, model, opt)


@pytest.mark.parametrize("change, named", [
    (lambda m, o: m[2].bias.data.add_(1e-12), "parameter 2.bias changed"),
    (lambda m, o: m[0].weight.data.view(-1)[3].copy_(float("nan")), "parameter 0.weight changed"),
    (lambda m, o: m[2].weight.grad.mul_(2), "2.weight.grad changed"),
    (lambda m, o: setattr(m[0].bias, "grad", None), "0.bias.grad: a tensor → None"),
    (lambda m, o: m[1].running_mean.add_(1), "buffer"),
    (lambda m, o: m[1].num_batches_tracked.add_(1), "num_batches_tracked"),
    (lambda m, o: o.state[m[2].bias]["momentum_buffer"].zero_(), "optimizer state of 2.bias['momentum_buffer']"),
    (lambda m, o: o.state[m[2].bias].update(extra=1), "optimizer state of 2.bias: keys added 'extra', lost none"),
    (lambda m, o: o.state.pop(m[1].weight), "lost for '1.weight'"),
    (lambda m, o: o.param_groups[0].update(lr=0.2), "'lr']: 0.1 → 0.2"),
    (lambda m, o: o.param_groups[0].update(momentum=1), "'momentum']: 0.9 → 1"),
], ids=["param", "param-nan", "grad", "grad-none", "running-mean", "batches-tracked", "state-tensor", "state-key",
        "state-entry", "lr", "momentum"])
def test_every_kind_of_change_is_seen_and_named(change, named):
    model, opt = _stepped()
    before = snapshot(model, opt)
    change(model, opt)
    with pytest.raises(AssertionError, match="changed:") as info:
        assert_untouched(before, model, opt)
    assert named in str(info.value)


def test_the_flags_compare_more_or_less():
    model, opt = _stepped()
    grad = model[0].weight.grad
    loose = snapshot(model, grads=False, buffers=False)
    strict = snapshot(model, grad_identity=True, versions=True)
    model[0].weight.grad = grad.clone()  # same values, another tensor
    model[1].running_var.add_(1)
    with torch.no_grad():
        model[2].bias.copy_(model[2].bias.clone())  # same values, written in place
    assert changes(loose, model) == []
    found = changes(strict, model)
    assert any("0.weight.grad is another object" in line for line in found)
    assert any("parameter 2.bias was written in place" in line for line in found)
    assert any("buffer 1.running_var changed" in line for line in found)


def test_an_optimizer_given_on_one_side_only_is_an_error():
    model, opt = _stepped()
    with pytest.raises(TypeError, match="both"):
        assert_untouched(snapshot(model), model, opt)
