"""CUDA: records on the parameters' device, the same gradients as autograd there; skipped without a GPU."""
import pytest
import torch

import torch_fadjoint as tfa

from .problems import random_problems
from .test_fadjoint import LOSS_FNS, max_relative_error
from . import oracles

pytestmark = pytest.mark.cuda


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)], ids=["f64", "f32"])
@pytest.mark.parametrize("problem", random_problems(20, seed=99), ids=str)
def test_fadjoint_grads_equal_autograd_on_cuda(problem, dtype, tol):
    model, x, target = problem.build(dtype, device="cuda")
    net = tfa.FPropagation(model)
    params = dict(model.named_parameters())
    torch.manual_seed(problem.seed)
    want = oracles.autograd_grads(lambda: model(x), params, problem.loss, target, problem.label_smoothing)
    torch.manual_seed(problem.seed)
    with torch.no_grad():
        out = net(x)
    assert all(layer.x_prev.is_cuda for layer in net.layers)
    kwargs = {"label_smoothing": problem.label_smoothing} if problem.loss == "cross_entropy" else {}
    net.adjoint(LOSS_FNS[problem.loss](out, target, **kwargs)[1])
    got = {name: p.grad for name, p in params.items()}
    assert max_relative_error(got, want) <= tol


def test_fadjoint_optimizer_on_cuda_matches_sgd_foreach():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(20, 64), torch.nn.ReLU(), torch.nn.Linear(64, 5)).cuda().double()
    ref = torch.nn.Sequential(torch.nn.Linear(20, 64), torch.nn.ReLU(), torch.nn.Linear(64, 5)).cuda().double()
    ref.load_state_dict(model.state_dict())
    net = tfa.FPropagation(model)
    opt = tfa.optim.FAdjoint(net, lr=0.1, momentum=0.9, validate=False)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9, foreach=True)
    for _ in range(50):
        x, t = torch.randn(32, 20, device="cuda", dtype=torch.float64), torch.randint(0, 5, (32,), device="cuda")
        net(x)
        opt.step(target=t)
        ref_opt.zero_grad()
        torch.nn.functional.cross_entropy(ref(x), t).backward()
        ref_opt.step()
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-10)
