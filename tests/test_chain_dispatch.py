"""The chain recorder runs a plain ``nn.Sequential`` chain itself (``ChainRecorder._run``: each leaf's hooks and
``forward`` called as ``nn.Module.__call__`` calls them, without its dispatch); whatever could make ``model(x)``
call something else sends the forward back through ``model(x)``. Each test fails if the direct run ignored it."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torch_fadjoint as tfa

DT = torch.float64


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Sequential(nn.Linear(5, 4), nn.ReLU()), nn.Linear(4, 3)).to(DT)


def _grads_match_autograd(model, x, t, *, graph=False):
    """One recorded forward and ``net.backward`` on the chain (or the tape) equal autograd's gradients."""
    reference = {n: p.detach().clone() for n, p in model.named_parameters()}
    net = tfa.FPropagation(model, graph=True) if graph else tfa.FPropagation(model)
    assert net.graph == graph
    net(x)
    net.backward(F.cross_entropy, t)
    ours = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    with net.paused():
        F.cross_entropy(model(x), t).backward()
    for name, param in model.named_parameters():
        assert torch.equal(param.detach(), reference[name])
        torch.testing.assert_close(ours[name], param.grad, rtol=1e-10, atol=1e-12)


def _batch():
    gen = torch.Generator().manual_seed(1)
    return torch.randn(8, 6, generator=gen, dtype=DT), torch.randint(0, 3, (8,), generator=gen)


def test_a_plain_chain_runs_directly_and_is_exact():
    model = _model()
    net = tfa.FPropagation(model)
    calls = []
    run = net._recorder._run
    net._recorder._run = lambda x: calls.append(1) or run(x)
    x, t = _batch()
    out = net(x)
    assert calls == [1]
    with net.paused():
        torch.testing.assert_close(out.detach(), model(x), rtol=0, atol=0)
    net.remove()
    _grads_match_autograd(model, x, t)


def test_a_leaf_class_with_its_own_call_is_called_through_it():
    """A registered layer's class may override ``__call__`` (or ``_call_impl``): the forward goes through it."""
    class Scaled(nn.Linear):
        def __call__(self, x):
            return super().__call__(x * 2.0)

    tfa.register_layer(Scaled, tfa.layers.LAYERS[nn.Linear])
    try:
        torch.manual_seed(0)
        model = nn.Sequential(Scaled(6, 5), nn.Tanh(), nn.Linear(5, 3)).to(DT)
        x, t = _batch()
        net = tfa.FPropagation(model)
        out = net(x)
        with net.paused():
            torch.testing.assert_close(out.detach(), model(x), rtol=0, atol=0)
        assert torch.equal(net.layers[0].x_prev, x * 2.0)  # what its __call__ passed on
    finally:
        tfa.layers.LAYERS.pop(Scaled)


def test_a_patched_sequential_forward_is_what_runs(monkeypatch):
    seen = []
    original = nn.Sequential.forward

    def forward(self, x):
        seen.append(type(self).__name__)
        return original(self, x)

    model = _model()
    net = tfa.FPropagation(model)
    monkeypatch.setattr(nn.Sequential, "forward", forward)
    x, t = _batch()
    with pytest.raises(RuntimeError, match=r"changed after wrapping; call net.attach\(\)"):  # its class's forward
        net(x)
    net.attach()
    assert net.graph  # not torch's own nn.Sequential.forward: the tape records what the patched one runs
    net(x)
    assert seen == ["Sequential", "Sequential"]  # the model and its inner Sequential
    net.remove()
    _grads_match_autograd(model, x, t, graph=True)


def test_a_second_recorder_on_the_same_model_sends_the_forward_through_model_call():
    model = _model()
    first, second = tfa.FPropagation(model), tfa.FPropagation(model)
    x, t = _batch()
    first(x)
    assert not first._pristine  # the other recorder's hooks: model(x) runs, with every hook
    first.backward(F.cross_entropy, t)
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    second(x)
    second.backward(F.cross_entropy, t)
    for before, param in zip(grads, model.parameters()):
        torch.testing.assert_close(param.grad, before, rtol=0, atol=0)


def test_a_module_compiled_in_place_is_called_through_its_compiled_call(monkeypatch):
    model = _model()
    net = tfa.FPropagation(model)
    calls = []
    leaf = model[1]
    leaf._compiled_call_impl = lambda *args, **kwargs: calls.append(1) or leaf._call_impl(*args, **kwargs)
    x, t = _batch()
    net(x)
    assert calls == [1]
    net.remove()
    del leaf._compiled_call_impl
    _grads_match_autograd(model, x, t)


def test_a_backward_hook_on_a_leaf_sends_the_forward_through_model_call_and_the_sweep_refuses_it():
    model = _model()
    net = tfa.FPropagation(model)
    model[1].register_full_backward_hook(lambda module, grad_in, grad_out: None)
    x, t = _batch()
    net(x)
    with pytest.raises(RuntimeError, match=r"has a backward hook"):
        net.backward(F.cross_entropy, t)
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("args", ["two", "keyword"])
def test_a_call_sequential_cannot_take_gets_torchs_own_error(args):
    model = _model()
    net = tfa.FPropagation(model)
    x, _ = _batch()
    with pytest.raises(TypeError):
        net(x, x) if args == "two" else net(input=x, extra=x)


def test_a_model_put_in_the_nets_place_is_refused_until_attached():
    """``net.model = other`` without ``attach``: the direct run would train the old model (red team, session 8)."""
    net = tfa.FPropagation(_model())
    other = _model()
    net.model = other
    x, t = _batch()
    with pytest.raises(RuntimeError, match=r"changed after wrapping; call net.attach\(\)"):
        net(x)
    net.attach(other)
    net(x)
    net.backward(F.cross_entropy, t)
    assert all(p.grad is not None for p in other.parameters())


def test_a_copied_net_asks_for_attach():
    import copy

    net = tfa.FPropagation(_model())
    twin = copy.deepcopy(net)
    x, t = _batch()
    with pytest.raises(RuntimeError, match=r"changed after wrapping; call net.attach\(\)"):
        twin(x)
    twin.attach()
    twin(x)
    twin.backward(F.cross_entropy, t)
    assert all(p.grad is not None for p in twin.model.parameters())
    assert all(p.grad is None for p in net.model.parameters())


def test_a_call_impl_set_on_a_module_is_called():
    """``model(x)`` calls an instance ``_call_impl`` (``_wrapped_call_impl`` reads it from the instance)."""
    model = _model()
    net = tfa.FPropagation(model)
    leaf, calls = model[3], []
    leaf._call_impl = lambda *args, **kwargs: calls.append(1) or nn.Module._call_impl(leaf, *args, **kwargs)
    x, t = _batch()
    out = net(x)
    assert calls == [1]
    with net.paused():
        torch.testing.assert_close(out.detach(), model(x), rtol=0, atol=0)


def test_a_patched_sequential_iter_is_what_runs(monkeypatch):
    model = _model()
    net = tfa.FPropagation(model)
    original, seen = nn.Sequential.__iter__, []

    def iterate(self):
        seen.append(len(self))
        return original(self)

    monkeypatch.setattr(nn.Sequential, "__iter__", iterate)
    net(_batch()[0])
    assert seen == [4, 2]


def test_only_torchs_own_functions_count_as_unpatched():
    """A patch made before torch_fadjoint was imported is no reference: the direct run is then never taken."""
    from torch_fadjoint.chain import _torchs

    def forward(self, input):
        return input

    assert _torchs(nn.Sequential.forward, "torch.nn.modules.container", "Sequential.forward",
                   "torch/nn/modules/container.py") is nn.Sequential.forward
    assert _torchs(forward, "torch.nn.modules.container", "Sequential.forward",
                   "torch/nn/modules/container.py") is None
    forward.__module__, forward.__qualname__ = "torch.nn.modules.container", "Sequential.forward"
    assert _torchs(forward, "torch.nn.modules.container", "Sequential.forward", "torch/nn/modules/container.py") is None


@pytest.mark.parametrize("graph", [False, True])
def test_a_class_forward_patched_after_wrapping_is_refused(monkeypatch, graph):
    """``nn.Linear.forward`` patched at class level after wrapping computes what the table entry does not say (the
    gradient was 0.31 off on the chain since session 1; session 8's red team): the model changed, refused."""
    model = _model()
    net = tfa.FPropagation(model, graph=graph)
    original = nn.Linear.forward
    monkeypatch.setattr(nn.Linear, "forward", lambda self, x: original(self, x) * 2.0)
    with pytest.raises(RuntimeError, match=r"changed after wrapping; call net.attach\(\)"):
        net(_batch()[0])


def test_a_class_forward_made_anew_at_every_access_is_no_change():
    """A ``functools.partialmethod`` forward is a new function at every ``cls.forward``: the same class, not a
    patch (the detailed comparison reads the class's own attribute)."""
    from functools import partialmethod

    class Scale(nn.Module):
        def scaled(self, x, k):
            return x * k
        forward = partialmethod(scaled, k=2.0)

    assert Scale.forward is not Scale.forward
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), Scale(), nn.Tanh(), nn.Linear(5, 3)).to(DT)
    x, t = _batch()
    net = tfa.FPropagation(model)
    assert net.graph  # Scale has no table entry: the tape records its ops
    for _ in range(2):
        net(x)
    net.remove()
    _grads_match_autograd(model, x, t, graph=True)



# -- session 8's second red team: older faults of the chain, each silently wrong or misleading before ---------------
@pytest.mark.parametrize("where", ["outer", "inner"])
@pytest.mark.parametrize("kind", ["pre", "full"])
def test_a_containers_backward_hook_is_refused_before_anything_is_written(where, kind):
    """autograd calls a container's backward hooks with its gradients (×0 here: 0.27 off when ignored)."""
    model = _model()
    container = model if where == "outer" else model[2]
    if kind == "pre":
        container.register_full_backward_pre_hook(lambda module, grad_out: (grad_out[0] * 0,))
    else:
        container.register_full_backward_hook(lambda module, grad_in, grad_out: (grad_in[0] * 3,))
    net = tfa.FPropagation(model)
    opt = tfa.optim.FAdjoint(net, lr=0.1, momentum=0.9)
    before = [p.detach().clone() for p in model.parameters()]
    x, t = _batch()
    net(x)
    with pytest.raises(RuntimeError, match=r"^FPropagation: (<model>|2) \(Sequential\) has a backward hook"):
        opt.step(target=t)
    assert all(torch.equal(p, b) and p.grad is None for p, b in zip(model.parameters(), before))
    assert not opt.state


def test_a_patched_getattribute_is_read_through():
    """``nn.Linear.__getattribute__`` patched to give another weight: what the forward reads is not the parameter
    the model was wrapped with (0.08 off, the weights' .grad None, when the registries were read instead)."""
    model = _model()
    net = tfa.FPropagation(model)

    def doubled(self, name):
        return object.__getattribute__(self, name) if name != "weight" else nn.Module.__getattr__(self, name) * 2

    nn.Linear.__getattribute__ = doubled
    try:
        with pytest.raises(ValueError, match=r"its weight is not the parameter it was wrapped with"):
            net(_batch()[0])
    finally:
        del nn.Linear.__getattribute__
    assert all(p.grad is None for p in model.parameters())


def test_torchs_class_with_a_forward_patched_before_wrapping_goes_to_the_tape(monkeypatch):
    """``nn.Linear.forward`` patched before wrapping computes what the Linear entry does not say (0.30 off on the
    chain): the chain refuses it, so the tape records the ops the patched forward runs, exact."""
    original = nn.Linear.forward
    monkeypatch.setattr(nn.Linear, "forward", lambda self, x: original(self, x) * 2.0)
    model = _model()
    with pytest.raises(TypeError, match=r"its class's forward is not torch's own"):
        tfa.FPropagation(model, graph=False)
    net = tfa.FPropagation(model)
    assert net.graph
    net.remove()
    x, t = _batch()
    _grads_match_autograd(model, x, t, graph=True)


def test_an_in_place_map_over_a_kept_output_is_refused_at_the_forward():
    """keep_pre_activations (LFP sets it) keeps Y^k; ReLU(inplace=True) overwrites it during the forward: refused
    there, naming the map (the step said "modified after the forward; run the forward again", which never helped)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(inplace=True), nn.Linear(5, 3)).to(DT)
    net = tfa.FPropagation(model, keep_pre_activations=True)
    with pytest.raises(ValueError, match=r"^1 \(ReLU\): an in-place map overwrites its input Y\^1, which "
                                         r"keep_pre_activations keeps"):
        net(_batch()[0])
    plain = tfa.FPropagation(model)  # not kept: the in-place map is exact
    x, t = _batch()
    plain(x)
    plain.backward(F.cross_entropy, t)
    ours = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    with plain.paused():
        F.cross_entropy(model(x), t).backward()
    for got, param in zip(ours, model.parameters()):
        torch.testing.assert_close(got, param.grad, rtol=1e-10, atol=1e-12)


def test_a_containers_backward_hook_on_the_tape_is_named_at_the_forward():
    """On the tape the hook's autograd.Function (torch's BackwardHook) was refused as "runs inside a
    torch.autograd.Function": the message names the hook now (session 8's second red team)."""
    model = _model()
    model[2].register_full_backward_pre_hook(lambda module, grad_out: (grad_out[0] * 0,))
    net = tfa.FPropagation(model, graph=True)
    with pytest.raises(ValueError, match=r"^FPropagation: 2 \(Sequential\) has a backward hook, which autograd would "
                                         r"call and the F-adjoint does not; the forward is refused"):
        net(_batch()[0])
