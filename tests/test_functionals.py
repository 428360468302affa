"""The function entries of the layers, poolings and dropout against autograd (STYLE T1; docs/maths.md §7.1, §6.1).

tests/test_junctions.py's harness (its Draw, casts and keys; its ``_check`` copied here as :func:`_check` with
three additions: ``constants``, the tensor arguments autograd does not differentiate — BatchNorm's running
statistics, which it refuses to see requiring grad; ``seed``, set before the entry's call, the plain call and
autograd's, so that dropout draws the same mask in each; and the entry's output compared bit for bit with the
plain call's under no_grad). float64 within 1e-10 of the larger of the reference's max-abs and 1e-8; float32
within 1e-5 and bit for bit: every entry here calls autograd's own kernels (CPU). Dropout also leaves the random
state as the plain call does. Modules run through a minimal tape give the plain module's outputs and buffers.
Every refusal in one line, before the call.
"""
from __future__ import annotations

import re
import warnings
import zlib
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

import torch_fadjoint.functionals as functionals
import torch_fadjoint.poolings as poolings
from torch_fadjoint.junctions import JUNCTIONS, Junction

from . import oracles
from . import test_junctions as harness
from .test_junctions import DT, Draw, _cast, _inputs, _substitute


@dataclass
class Case:
    id: str
    op: object
    make: object  # Draw -> (args, kwargs)
    drop: tuple = ()  # outputs that receive no adjoint
    constants: tuple = ()  # keys of tensor arguments autograd does not differentiate (running statistics)
    seed: int | None = None  # dropout: torch.manual_seed before each call
    same_forward: bool = True  # autograd's forward (inputs requiring grad) computes the plain call's bits

    def __str__(self):
        return self.id


CASES: list[Case] = []


def case(id, op, make, **options):
    CASES.append(Case(id, op, make, **options))


def w(d, *shape):
    return d.n(*shape, scale=0.5)


# ---------------------------------------------------------------- F.linear
case("linear-2d-bias", F.linear, lambda d: ((d.n(3, 4), w(d, 5, 4), d.n(5)), {}))
case("linear-2d-no-bias", F.linear, lambda d: ((d.n(3, 4), w(d, 5, 4)), {}))
case("linear-3d-tokens-bias", F.linear, lambda d: ((d.n(2, 3, 4), w(d, 5, 4), d.n(5)), {}))
case("linear-3d-tokens-no-bias", F.linear, lambda d: ((d.n(2, 3, 4), w(d, 5, 4), None), {}))
case("linear-4d-bias", F.linear, lambda d: ((d.n(2, 2, 3, 4), w(d, 5, 4), d.n(5)), {}))
case("linear-1d-bias", F.linear, lambda d: ((d.n(4), w(d, 5, 4), d.n(5)), {}))
case("linear-1d-no-bias", F.linear, lambda d: ((d.n(4), w(d, 5, 4)), {}))
case("linear-keywords", F.linear, lambda d: ((), {"input": d.n(3, 4), "weight": w(d, 2, 4), "bias": d.n(2)}))
case("linear-column-major-input", F.linear, lambda d: ((d.n(4, 3).t(), w(d, 5, 4), d.n(5)), {}))
case("linear-tied-transposed-weight", F.linear, lambda d: ((d.n(3, 4), w(d, 4, 5).t(), d.n(5)), {}))
case("linear-batch-of-1-in-1", F.linear, lambda d: ((d.n(1, 1), w(d, 3, 1), d.n(3)), {}))
case("linear-3d-non-contiguous", F.linear, lambda d: ((d.n(2, 4, 3).transpose(1, 2), w(d, 5, 4), d.n(5)), {}),
     same_forward=False)  # under no_grad aten's matmul runs a bmm; with a weight requiring grad it folds into an mm

# ---------------------------------------------------------------- F.conv1d / conv2d / conv3d
case("conv1d-bias", F.conv1d, lambda d: ((d.n(2, 3, 9), w(d, 4, 3, 3), d.n(4)), {}))
case("conv1d-stride-pad-dilation", F.conv1d, lambda d: ((d.n(2, 2, 11), w(d, 3, 2, 3), None, 2, 2, 2), {}))
case("conv1d-unbatched", F.conv1d, lambda d: ((d.n(3, 8), w(d, 2, 3, 3), d.n(2)), {}))
case("conv1d-same-even-dilated", F.conv1d, lambda d: ((d.n(2, 2, 7), w(d, 3, 2, 2), d.n(3)),
                                                      {"padding": "same", "dilation": 3}))
case("conv2d-bias", F.conv2d, lambda d: ((d.n(2, 3, 6, 6), w(d, 4, 3, 3, 3), d.n(4)), {}))
case("conv2d-stride2-pad1-no-bias", F.conv2d, lambda d: ((d.n(2, 3, 7, 7), w(d, 4, 3, 3, 3)),
                                                         {"stride": 2, "padding": 1}))
case("conv2d-groups-dilation", F.conv2d, lambda d: ((d.n(2, 4, 8, 8), w(d, 6, 2, 3, 3), d.n(6), 1, 2, 2, 2), {}))
case("conv2d-depthwise", F.conv2d, lambda d: ((d.n(2, 3, 5, 5), w(d, 3, 1, 3, 3), d.n(3)),
                                              {"padding": 1, "groups": 3}))
case("conv2d-same-odd-kernel", F.conv2d, lambda d: ((d.n(2, 2, 5, 6), w(d, 3, 2, 3, 3), d.n(3)), {"padding": "same"}))
case("conv2d-same-even-kernel", F.conv2d, lambda d: ((d.n(2, 2, 5, 6), w(d, 3, 2, 4, 2), d.n(3)),
                                                     {"padding": "same"}))
case("conv2d-valid", F.conv2d, lambda d: ((d.n(2, 2, 5, 5), w(d, 3, 2, 2, 2), d.n(3)), {"padding": "valid"}))
case("conv2d-tuple-geometry", F.conv2d, lambda d: ((d.n(2, 2, 7, 6), w(d, 3, 2, 3, 2), d.n(3), (2, 1), (1, 0),
                                                    (1, 2)), {}))
case("conv2d-unbatched", F.conv2d, lambda d: ((d.n(2, 5, 5), w(d, 3, 2, 3, 3), d.n(3)), {}))
case("conv2d-keywords", F.conv2d, lambda d: ((), {"input": d.n(1, 2, 4, 4), "weight": w(d, 3, 2, 2, 2),
                                                  "bias": d.n(3), "stride": (1, 2)}))
case("conv3d-bias", F.conv3d, lambda d: ((d.n(2, 2, 4, 5, 4), w(d, 3, 2, 2, 3, 2), d.n(3)), {"padding": 1}))
case("conv3d-same-even", F.conv3d, lambda d: ((d.n(1, 2, 4, 4, 5), w(d, 2, 2, 2, 3, 2), None), {"padding": "same"}))

# ---------------------------------------------------------------- F.batch_norm / layer_norm / group_norm
STATS = (1, 2)  # F.batch_norm's running_mean and running_var: constants to autograd


def stats(d, c):
    return d.n(c, scale=0.3), 0.5 + d.n(c).abs()


case("batch_norm-train-no-stats-2d", F.batch_norm, lambda d: ((d.n(5, 3), None, None, d.n(3), d.n(3), True), {}))
case("batch_norm-train-stats-4d", F.batch_norm, lambda d: ((d.n(4, 3, 3, 3), *stats(d, 3), d.n(3), d.n(3), True, 0.3),
                                                           {}), constants=STATS)
case("batch_norm-train-no-affine-3d", F.batch_norm, lambda d: ((d.n(3, 2, 5), *stats(d, 2)), {"training": True}),
     constants=STATS)
case("batch_norm-train-weight-only", F.batch_norm, lambda d: ((d.n(4, 3), None, None), {"weight": d.n(3),
                                                                                         "training": True}))
case("batch_norm-train-batch-of-1-spatial", F.batch_norm, lambda d: ((d.n(1, 2, 3, 3), None, None, d.n(2), d.n(2),
                                                                      True), {}))
case("batch_norm-eval-4d", F.batch_norm, lambda d: ((d.n(3, 3, 2, 4), *stats(d, 3), d.n(3), d.n(3)), {}),
     constants=STATS)
case("batch_norm-eval-no-affine-2d", F.batch_norm, lambda d: ((d.n(4, 3), *stats(d, 3)), {"eps": 1e-3}),
     constants=STATS)
case("batch_norm-eval-5d-keywords", F.batch_norm,
     lambda d: ((), {"input": d.n(2, 2, 2, 3, 2), "running_mean": d.n(2), "running_var": 1 + d.n(2).abs(),
                     "weight": d.n(2), "bias": d.n(2), "training": False}),
     constants=("running_mean", "running_var"))
case("layer_norm-last", F.layer_norm, lambda d: ((d.n(3, 5), (5,), d.n(5), d.n(5)), {}))
case("layer_norm-two-dims-tokens", F.layer_norm, lambda d: ((d.n(2, 3, 4, 5), [4, 5], d.n(4, 5), d.n(4, 5)), {}))
case("layer_norm-no-affine", F.layer_norm, lambda d: ((d.n(4, 6), (6,)), {"eps": 1e-3}))
case("layer_norm-weight-only-keywords", F.layer_norm, lambda d: ((), {"input": d.n(2, 3, 4), "normalized_shape": [4],
                                                                       "weight": d.n(4)}))
case("group_norm-4d", F.group_norm, lambda d: ((d.n(2, 6, 3, 3), 3, d.n(6), d.n(6)), {}))
case("group_norm-3d-no-affine", F.group_norm, lambda d: ((d.n(3, 4, 5), 2), {}))
case("group_norm-2d-one-group", F.group_norm, lambda d: ((d.n(3, 4), 1, d.n(4), d.n(4)), {"eps": 1e-3}))
case("group_norm-channels-last", F.group_norm,
     lambda d: ((d.n(2, 4, 3, 3).contiguous(memory_format=torch.channels_last), 4, d.n(4), d.n(4)), {}))

# ---------------------------------------------------------------- poolings
case("max_pool1d", F.max_pool1d, lambda d: ((d.n(2, 3, 8), 2), {}))
case("max_pool1d-stride-pad-dilation-ceil", F.max_pool1d, lambda d: ((d.n(2, 3, 10), 3, 2, 1, 2, True), {}))
case("max_pool2d", F.max_pool2d, lambda d: ((d.n(2, 3, 6, 6), 2), {}))
case("max_pool2d-ties", F.max_pool2d, lambda d: ((d.n(2, 2, 6, 6).round(), 3, 2, 1), {}))
case("max_pool2d-ceil-dilation-unbatched", F.max_pool2d,
     lambda d: ((d.n(3, 7, 6), (3, 2)), {"stride": (2, 1), "padding": (1, 0), "dilation": (1, 2), "ceil_mode": True}))
case("max_pool2d-return-indices", F.max_pool2d, lambda d: ((d.n(2, 2, 4, 4), 2), {"return_indices": True}))
case("max_pool3d", F.max_pool3d, lambda d: ((d.n(2, 2, 4, 4, 6), 2), {"stride": (2, 2, 3)}))
case("max_pool1d_with_indices", F.max_pool1d_with_indices, lambda d: ((d.n(2, 2, 9), 3), {}))
case("max_pool2d_with_indices", F.max_pool2d_with_indices, lambda d: ((d.n(2, 2, 6, 5), 2, 1), {}))
case("max_pool3d_with_indices", F.max_pool3d_with_indices, lambda d: ((d.n(1, 2, 4, 4, 4), 2), {}))
case("avg_pool1d", F.avg_pool1d, lambda d: ((d.n(2, 3, 8), 2), {}))
case("avg_pool1d-pad-ceil-no-count", F.avg_pool1d, lambda d: ((d.n(2, 3, 9), 4, 2, 1, True, False), {}))
case("avg_pool2d", F.avg_pool2d, lambda d: ((d.n(2, 3, 6, 6), 2), {}))
case("avg_pool2d-pad-ceil-no-count", F.avg_pool2d, lambda d: ((d.n(2, 2, 7, 5), 3, 2, 1),
                                                              {"ceil_mode": True, "count_include_pad": False}))
case("avg_pool2d-divisor-override", F.avg_pool2d, lambda d: ((d.n(2, 2, 6, 6), (3, 2)), {"divisor_override": 5}))
case("avg_pool2d-channels-last", F.avg_pool2d,
     lambda d: ((d.n(2, 3, 6, 6).contiguous(memory_format=torch.channels_last), 3, 1, 1), {}))
case("avg_pool3d", F.avg_pool3d, lambda d: ((d.n(2, 2, 4, 4, 4), 2), {}))
case("avg_pool3d-divisor-pad", F.avg_pool3d, lambda d: ((d.n(1, 2, 5, 4, 4), 3, 2, 1),
                                                        {"divisor_override": 7, "ceil_mode": True}))
case("adaptive_avg_pool1d", F.adaptive_avg_pool1d, lambda d: ((d.n(2, 3, 10), 4), {}))
case("adaptive_avg_pool1d-to-1", F.adaptive_avg_pool1d, lambda d: ((d.n(2, 3, 7), 1), {}))
case("adaptive_avg_pool2d", F.adaptive_avg_pool2d, lambda d: ((d.n(2, 3, 7, 5), (3, 2)), {}))
case("adaptive_avg_pool2d-to-1", F.adaptive_avg_pool2d, lambda d: ((d.n(2, 3, 5, 6), 1), {}))
case("adaptive_avg_pool2d-none", F.adaptive_avg_pool2d, lambda d: ((d.n(2, 3, 5, 6), (None, 4)), {}))
case("adaptive_avg_pool3d", F.adaptive_avg_pool3d, lambda d: ((d.n(2, 2, 5, 4, 6), (2, 1, 4)), {}))
case("adaptive_avg_pool3d-to-1", F.adaptive_avg_pool3d, lambda d: ((d.n(2, 2, 3, 4, 2), 1), {}))
case("adaptive_max_pool1d", F.adaptive_max_pool1d, lambda d: ((d.n(2, 3, 10), 4), {}))
case("adaptive_max_pool2d", F.adaptive_max_pool2d, lambda d: ((d.n(2, 3, 7, 5), (3, 2)), {}))
case("adaptive_max_pool3d", F.adaptive_max_pool3d, lambda d: ((d.n(1, 2, 5, 4, 6), 2), {}))
case("adaptive_max_pool2d-return-indices", F.adaptive_max_pool2d, lambda d: ((d.n(2, 2, 5, 5), 3, True), {}))
case("adaptive_max_pool1d_with_indices", F.adaptive_max_pool1d_with_indices, lambda d: ((d.n(2, 2, 9), 3), {}))
case("adaptive_max_pool2d_with_indices", F.adaptive_max_pool2d_with_indices, lambda d: ((d.n(2, 2, 6, 5), 2), {}))
case("adaptive_max_pool3d_with_indices", F.adaptive_max_pool3d_with_indices, lambda d: ((d.n(1, 2, 4, 4, 4), 2), {}))

# ---------------------------------------------------------------- dropout (the same seed for the entry and autograd)
case("dropout", F.dropout, lambda d: ((d.n(4, 5), 0.3), {}), seed=1)
case("dropout-inplace", F.dropout, lambda d: ((d.n(4, 5),), {"p": 0.6, "inplace": True}), seed=2)
case("dropout-non-contiguous", F.dropout, lambda d: ((d.n(5, 4).t(), 0.4), {}), seed=3)
case("dropout-eval-identity", F.dropout, lambda d: ((d.n(4, 5), 0.3, False), {}))
case("dropout-p0-identity", F.dropout, lambda d: ((d.n(4, 5), 0.0), {}), seed=5)
case("dropout1d", F.dropout1d, lambda d: ((d.n(4, 3, 5), 0.5), {}), seed=6)
case("dropout1d-unbatched", F.dropout1d, lambda d: ((d.n(6, 5), 0.5), {}), seed=7)
case("dropout2d", F.dropout2d, lambda d: ((d.n(3, 4, 3, 3), 0.4), {}), seed=8)
case("dropout2d-3d-input", F.dropout2d, lambda d: ((d.n(3, 4, 5), 0.4), {}), seed=9)
case("dropout2d-inplace", F.dropout2d, lambda d: ((d.n(3, 4, 3, 3), 0.5, True, True), {}), seed=10)
case("dropout3d", F.dropout3d, lambda d: ((d.n(2, 4, 2, 3, 2), 0.5), {}), seed=11)
case("dropout3d-unbatched", F.dropout3d, lambda d: ((d.n(4, 2, 3, 2),), {"p": 0.5, "training": True}), seed=12)
case("dropout1d-eval-identity", F.dropout1d, lambda d: ((d.n(2, 4, 3), 0.5, False), {}))
case("dropout2d-eval-identity", F.dropout2d, lambda d: ((d.n(2, 4, 3, 3),), {"training": False}))
case("dropout3d-eval-identity", F.dropout3d, lambda d: ((d.n(2, 4, 3, 3, 2), 0.5, False), {}))


def _check(case: Case, dtype, bitwise: bool):
    """tests/test_junctions.py's ``_check`` with ``constants`` left out of the differentiated inputs, ``seed`` set
    before each of the two calls and the plain call's output compared; the adjoints compared by its
    ``compare_adjoints``."""
    args, kwargs = case.make(Draw(zlib.crc32(case.id.encode())))
    args, kwargs = _cast(args, dtype), _cast(kwargs, dtype)
    entry = JUNCTIONS[case.op]
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # dropout2d's 3-d input
        mine_args, mine_kwargs = _cast(args, dtype), _cast(kwargs, dtype)
        if case.seed is not None:
            torch.manual_seed(case.seed)
        out, saved = entry.run(case.op, mine_args, mine_kwargs)
    if entry.writes_first(args, kwargs):
        assert out is mine_args[0], "an in-place call returns the tensor it wrote"
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if case.seed is not None:
            torch.manual_seed(case.seed)
        plain = case.op(*_cast(args, dtype), **_cast(kwargs, dtype))
    for mine, ref in zip(out if isinstance(out, tuple) else (out,), plain if isinstance(plain, tuple) else (plain,)):
        assert torch.equal(mine, ref), "the entry's run computes what the plain call computes, bit for bit"
    outs = out if isinstance(out, tuple) else (out,)
    gen = torch.Generator().manual_seed(1)
    adjs = tuple(None if i in case.drop or not o.is_floating_point() else
                 torch.randn(o.shape, generator=gen, dtype=DT).to(o.dtype) for i, o in enumerate(outs))
    out_adj = adjs if isinstance(out, tuple) else adjs[0]
    with torch.no_grad():
        got = entry.input_adjoints(saved, out_adj)
    keys, tensors = zip(*[(k, t) for k, t in _inputs(args, kwargs) if k not in case.constants])

    def call(*leaves):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            a, k = _substitute(args, kwargs, {key: leaf.clone() for key, leaf in zip(keys, leaves)})
            if case.seed is not None:
                torch.manual_seed(case.seed)
            return case.op(*a, **k)

    ref_out, wants = oracles.vjp(call, tensors, out_adj)
    for mine, ref in zip(outs, ref_out if isinstance(out, tuple) else (ref_out,)):
        same = torch.equal(mine, ref) if case.same_forward else torch.allclose(mine, ref, rtol=1e-5, atol=1e-6)
        assert same, "autograd's forward computes what the entry's run computes"
    harness.compare_adjoints(got, keys, wants, dtype, bitwise)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_adjoints_equal_autograd_float64(case):
    _check(case, torch.float64, bitwise=False)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_adjoints_equal_autograd_float32(case):
    """Within 1e-5, and bit for bit: every entry here calls autograd's own kernels."""
    _check(case, torch.float32, bitwise=True)


MINE = {op for op, entry in JUNCTIONS.items() if type(entry).__module__ in (functionals.__name__, poolings.__name__)}


def test_every_entry_has_a_case():
    assert len(CASES) >= 40
    missing = {JUNCTIONS[op].name for op in MINE if op not in {c.op for c in CASES}}
    assert not missing, f"entries without a case: {sorted(missing)}"
    assert all(isinstance(JUNCTIONS[op], Junction) and JUNCTIONS[op].name != "?" for op in MINE)


# ---------------------------------------------------------------- dropout: the plain call's draw, its random state

DROPOUTS = {  # id: (function, input shape, keywords)
    "dropout": (F.dropout, (6, 7), {"p": 0.3}),
    "dropout-inplace": (F.dropout, (6, 7), {"p": 0.5, "inplace": True}),
    "dropout-p1": (F.dropout, (6, 7), {"p": 1.0}),
    "dropout-p1-inplace": (F.dropout, (6, 7), {"p": 1.0, "inplace": True}),
    "dropout-p0": (F.dropout, (6, 7), {"p": 0.0}),
    "dropout-eval": (F.dropout, (6, 7), {"training": False}),
    "dropout-empty": (F.dropout, (0, 7), {"p": 0.5}),
    "dropout1d-unbatched-inplace": (F.dropout1d, (5, 6), {"p": 0.5, "inplace": True}),
    "dropout2d-p1": (F.dropout2d, (2, 5, 3, 3), {"p": 1.0}),
    "dropout3d": (F.dropout3d, (2, 5, 2, 3, 2), {"p": 0.2}),
}


@pytest.mark.parametrize("name", sorted(DROPOUTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_dropout_draws_what_the_plain_call_draws(name, dtype):
    """Under the same seed, the entry's output is the plain call's bit for bit and the random state after it is the
    same (the entry is torch's own call); the adjoint is autograd's bit for bit (p = 1: its zeros, -0.0 included)."""
    op, shape, kwargs = DROPOUTS[name]
    x = torch.randn(shape, dtype=dtype) * 2
    torch.manual_seed(7)
    with torch.no_grad():
        out, saved = JUNCTIONS[op].run(op, (x.clone(),), dict(kwargs))
    after = torch.get_rng_state()
    torch.manual_seed(7)
    plain = op(x.clone(), **kwargs)
    assert torch.equal(out, plain) and torch.equal(torch.signbit(out), torch.signbit(plain))
    assert torch.equal(after, torch.get_rng_state()), "the entry draws as many random numbers as the call"
    out_adj = torch.randn(out.shape, dtype=dtype)
    torch.manual_seed(7)
    _, (want,) = oracles.vjp(lambda t: op(t.clone(), **kwargs), [x], out_adj)
    have = JUNCTIONS[op].input_adjoints(saved, out_adj)[0]
    assert torch.equal(have, want) and torch.equal(torch.signbit(have), torch.signbit(want))


# ---------------------------------------------------------------- what the modules call

class _Tape(TorchFunctionMode):
    """A minimal tape: every call found in the table runs through its entry (the rest as is)."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.seen.append(func)
        entry = JUNCTIONS.get(func)
        return func(*args, **(kwargs or {})) if entry is None else entry.run(func, args, kwargs or {})[0]


MODULES = {  # a module, its input shape and the table key its forward reaches a function mode as
    "Linear": (lambda: nn.Linear(4, 3), (2, 5, 4), F.linear),
    "Conv1d": (lambda: nn.Conv1d(2, 3, 3, padding="same"), (2, 2, 7), F.conv1d),
    "Conv2d": (lambda: nn.Conv2d(2, 3, 3, stride=2, padding=1), (2, 2, 7, 7), F.conv2d),
    "Conv3d": (lambda: nn.Conv3d(2, 3, 2), (2, 2, 4, 4, 4), F.conv3d),
    "BatchNorm1d": (lambda: nn.BatchNorm1d(3), (4, 3), F.batch_norm),
    "BatchNorm2d": (lambda: nn.BatchNorm2d(3, momentum=None), (4, 3, 3, 3), F.batch_norm),
    "BatchNorm3d-eval": (lambda: nn.BatchNorm3d(2).eval(), (2, 2, 2, 3, 2), F.batch_norm),
    "LayerNorm": (lambda: nn.LayerNorm((3, 4)), (2, 3, 4), F.layer_norm),
    "GroupNorm": (lambda: nn.GroupNorm(2, 4), (2, 4, 3), F.group_norm),
    "MaxPool1d": (lambda: nn.MaxPool1d(2), (2, 3, 8), F.max_pool1d),
    "MaxPool2d": (lambda: nn.MaxPool2d(3, 2, 1), (2, 3, 7, 7), F.max_pool2d),
    "MaxPool2d-indices": (lambda: nn.MaxPool2d(2, return_indices=True), (2, 3, 6, 6), F.max_pool2d_with_indices),
    "MaxPool3d": (lambda: nn.MaxPool3d(2), (2, 2, 4, 4, 4), F.max_pool3d),
    "AvgPool1d": (lambda: nn.AvgPool1d(3), (2, 3, 9), F.avg_pool1d),
    "AvgPool2d": (lambda: nn.AvgPool2d(2, divisor_override=3), (2, 3, 6, 6), F.avg_pool2d),
    "AvgPool3d": (lambda: nn.AvgPool3d(2), (2, 2, 4, 4, 4), F.avg_pool3d),
    "AdaptiveAvgPool1d": (lambda: nn.AdaptiveAvgPool1d(3), (2, 3, 8), F.adaptive_avg_pool1d),
    "AdaptiveAvgPool2d": (lambda: nn.AdaptiveAvgPool2d(1), (2, 3, 5, 5), F.adaptive_avg_pool2d),
    "AdaptiveAvgPool3d": (lambda: nn.AdaptiveAvgPool3d(2), (2, 2, 4, 4, 4), F.adaptive_avg_pool3d),
    "AdaptiveMaxPool1d": (lambda: nn.AdaptiveMaxPool1d(3), (2, 3, 8), F.adaptive_max_pool1d),
    "AdaptiveMaxPool2d": (lambda: nn.AdaptiveMaxPool2d((2, 3)), (2, 3, 5, 7), F.adaptive_max_pool2d),
    "AdaptiveMaxPool3d": (lambda: nn.AdaptiveMaxPool3d(2), (2, 2, 4, 4, 4), F.adaptive_max_pool3d),
    "Dropout": (lambda: nn.Dropout(0.3), (4, 5), F.dropout),
    "Dropout1d": (lambda: nn.Dropout1d(0.3, inplace=True), (4, 5, 3), F.dropout1d),
    "Dropout2d": (lambda: nn.Dropout2d(0.3), (2, 4, 3, 3), F.dropout2d),
    "Dropout3d": (lambda: nn.Dropout3d(0.3), (2, 4, 2, 3, 2), F.dropout3d),
}


@pytest.mark.parametrize("name", sorted(MODULES))
def test_modules_reach_a_function_mode_as_a_table_key(name):
    """Each module's forward reaches a function mode as one call of the table (BatchNorm's ``Tensor.add_`` on
    ``num_batches_tracked`` before it); run through its entry, the module gives the plain module's output and
    buffers bit for bit, its random draw included."""
    make, shape, key = MODULES[name]
    x = torch.randn(shape)
    torch.manual_seed(3)
    plain_module = make()
    taped_module = make()
    taped_module.load_state_dict(plain_module.state_dict())
    torch.manual_seed(4)
    with torch.no_grad():
        plain = plain_module(x.clone())
    tape = _Tape()
    torch.manual_seed(4)
    with torch.no_grad(), tape:
        taped = taped_module(x.clone())
    assert key in tape.seen and key in JUNCTIONS and key in MINE
    assert [f for f in tape.seen if f in MINE] == [key], "the mode sees the outermost call only"
    for mine, ref in zip(taped if isinstance(taped, tuple) else (taped,), plain if isinstance(plain, tuple) else (plain,)):
        assert torch.equal(mine, ref)
    for (n, a), (_, b) in zip(taped_module.state_dict().items(), plain_module.state_dict().items()):
        assert torch.equal(a, b), f"buffer {n}"


def test_conv_padding_mode_arrives_as_a_pad_first():
    """``nn.Conv2d(padding_mode='reflect')`` calls F.pad(mode='reflect') and then F.conv2d without padding: the
    table refuses the pad (constant mode only), so such a module is refused by its first call."""
    tape, conv, x = _Tape(), nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect"), torch.randn(1, 2, 5, 5)
    with torch.no_grad(), tape, pytest.raises(ValueError, match=r"^F.pad: mode='reflect' is not in the table"):
        conv(x)
    assert tape.seen == [F.pad]


# ---------------------------------------------------------------- record alone, BatchNorm's statistics

RECORDED = ["batch_norm-train-stats-4d", "batch_norm-train-no-stats-2d", "batch_norm-eval-4d", "layer_norm-two-dims-tokens",
            "group_norm-channels-last", "group_norm-4d", "max_pool2d-ties", "max_pool1d", "max_pool3d",
            "max_pool2d_with_indices", "adaptive_max_pool2d", "adaptive_max_pool1d_with_indices", "conv2d-same-even-kernel",
            "linear-3d-tokens-bias", "dropout-eval-identity", "avg_pool2d-divisor-override", "adaptive_avg_pool2d-to-1"]


@pytest.mark.parametrize("name", RECORDED)
def test_record_after_a_plain_call_equals_run(name):
    """``record`` after the plain call (statistics and indices recomputed with the forward's kernel) gives run's
    adjoints bit for bit (float32)."""
    found = next(c for c in CASES if c.id == name)
    args, kwargs = found.make(Draw(zlib.crc32(found.id.encode())))
    entry = JUNCTIONS[found.op]
    with torch.no_grad():
        out, saved = entry.run(found.op, _cast(args, torch.float32), _cast(kwargs, torch.float32))
        a, k = _cast(args, torch.float32), _cast(kwargs, torch.float32)
        alone = entry.record(a, k, found.op(*a, **k))
    out_adj = torch.randn(out[0].shape if isinstance(out, tuple) else out.shape)
    out_adj = (out_adj, None) if isinstance(out, tuple) else out_adj
    ran, recorded = entry.input_adjoints(saved, out_adj), entry.input_adjoints(alone, out_adj)
    assert ran.keys() == recorded.keys() and all(torch.equal(ran[key], recorded[key]) for key in ran)


def test_batch_norm_updates_the_running_statistics_as_torch_and_keeps_eval_constants():
    x, weight, bias = torch.randn(5, 3, 2), torch.randn(3), torch.randn(3)
    mine, theirs = [torch.randn(3), torch.rand(3) + 0.5], None
    theirs = [t.clone() for t in mine]
    with torch.no_grad():
        out, _ = JUNCTIONS[F.batch_norm].run(F.batch_norm, (x, *mine, weight, bias, True, 0.2), {})
        plain = F.batch_norm(x, *theirs, weight, bias, True, 0.2)
    assert torch.equal(out, plain) and all(torch.equal(a, b) for a, b in zip(mine, theirs))
    # eval mode: the running statistics are copied, so a later update does not reach this call's adjoint
    out_adj = torch.randn(5, 3, 2)
    with torch.no_grad():
        _, saved = JUNCTIONS[F.batch_norm].run(F.batch_norm, (x, *mine, weight, bias, False), {})
    before = JUNCTIONS[F.batch_norm].input_adjoints(saved, out_adj)
    with torch.no_grad():
        F.batch_norm(torch.randn(5, 3, 2) * 9, *mine, weight, bias, True, 0.9)  # a later call updates them
    after = JUNCTIONS[F.batch_norm].input_adjoints(saved, out_adj)
    assert all(torch.equal(before[key], after[key]) for key in before)


# ---------------------------------------------------------------- refusals, in one line, before the call

def _x(*shape):
    return torch.randn(shape, dtype=DT)


REFUSALS = {  # id: (callable, args, kwargs, exception, message)
    "linear-sparse-input": (F.linear, (_x(3, 4).to_sparse(), _x(2, 4)), {}, TypeError,
                            "F.linear: a torch.sparse_coo tensor; expected strided (dense) tensors"),
    "linear-1d-weight": (F.linear, (_x(3, 4), _x(4)), {}, ValueError,
                         "F.linear: a 1-d weight; expected an (out_features, in_features) weight"),
    "conv2d-complex": (F.conv2d, (_x(1, 2, 4, 4).to(torch.complex128), _x(3, 2, 2, 2).to(torch.complex128)), {},
                       TypeError, "F.conv2d: a complex tensor (torch.complex128); expected real floating tensors"),
    "batch_norm-sparse-weight": (F.batch_norm, (_x(4, 3), None, None, _x(3).to_sparse()), {"training": True},
                                 TypeError, "F.batch_norm: a torch.sparse_coo tensor; expected strided (dense) tensors"),
    "layer_norm-complex": (F.layer_norm, (_x(2, 3).to(torch.complex128), (3,)), {}, TypeError,
                           "F.layer_norm: a complex tensor (torch.complex128); expected real floating tensors"),
    "max_pool2d-sparse": (F.max_pool2d, (_x(1, 2, 4, 4).to_sparse(), 2), {}, TypeError,
                          "F.max_pool2d: a torch.sparse_coo tensor; expected strided (dense) tensors"),
    "avg_pool1d-complex": (F.avg_pool1d, (_x(1, 2, 4).to(torch.complex128), 2), {}, TypeError,
                           "F.avg_pool1d: a complex tensor (torch.complex128); expected real floating tensors"),
    "dropout-complex-inplace": (F.dropout, (_x(3, 4).to(torch.complex128), 0.5, True, True), {}, TypeError,
                                "F.dropout: a complex tensor (torch.complex128); expected real floating tensors"),
}


@pytest.mark.parametrize("name", sorted(REFUSALS))
def test_refusals_are_one_line(name):
    """Each refusal, through ``run`` (before the call: every argument left as it was) and through ``record``."""
    op, args, kwargs, error, message = REFUSALS[name]
    def values():
        return [a.to_dense() if a.layout != torch.strided else a.clone() for a in args if isinstance(a, Tensor)]

    before = values()
    with torch.no_grad(), pytest.raises(error) as caught:
        JUNCTIONS[op].run(op, args, dict(kwargs))
    assert str(caught.value) == message and "\n" not in message
    assert all(torch.equal(a, b) for a, b in zip(values(), before))
    with pytest.raises(error, match=re.escape(message)):
        JUNCTIONS[op].record(args, kwargs, args[0])


@pytest.mark.parametrize("op, shape", [(F.dropout, (2, 3)), (F.dropout1d, (2, 3, 4)), (F.dropout2d, (2, 3, 4, 4)),
                                       (F.dropout3d, (2, 3, 2, 2, 2))], ids=lambda v: getattr(v, "__name__", ""))
def test_dropout_record_alone_refuses(op, shape):
    """The mask is the call's own random draw: ``record`` after a plain call cannot know it and refuses (in eval
    mode there is no mask, and record works)."""
    x = _x(*shape)
    with torch.no_grad():
        out = op(x, 0.5)
    with pytest.raises(ValueError, match=re.escape(f"F.{op.__name__}: the mask is drawn by the call; record it "
                                                   "through Junction.run")):
        JUNCTIONS[op].record((x, 0.5), {}, out)
    assert JUNCTIONS[op].input_adjoints(JUNCTIONS[op].record((x, 0.5, False), {}, x), x)[0] is x


def test_torch_raises_its_own_errors():
    """What torch itself refuses is torch's to say (the entry does not pre-empt it): a batch of one value per
    channel in train mode, padding='same' with a stride, a dropout probability above 1."""
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        JUNCTIONS[F.batch_norm].run(F.batch_norm, (_x(1, 3), None, None), {"training": True})
    with pytest.raises(RuntimeError, match="padding='same' is not supported for strided convolutions"):
        JUNCTIONS[F.conv2d].run(F.conv2d, (_x(1, 2, 5, 5), _x(3, 2, 3, 3)), {"padding": "same", "stride": 2})
    with pytest.raises(ValueError, match="dropout probability has to be between 0 and 1, but got 1.5"):
        JUNCTIONS[F.dropout].run(F.dropout, (_x(2, 3), 1.5), {})
