"""torch 2.14.1's dynamo, standalone (plain torch): a function that reads a global dict keyed by tensors and then
graph-breaks returns, when called again with another key, the value of the FIRST key. Silently: no error.

    python scripts/dynamo_tensor_key_graph_break.py

prints (torch 2.14.1, CPU) and exits 1::

    eager:    [[10.0, 10.0, 10.0], [11.0, 11.0, 11.0]]
    compiled: [[10.0, 10.0, 10.0], [10.0, 10.0, 10.0]]

Any graph break does it (``torch._dynamo.graph_break()``, ``tensor.is_inference()``); without the break, with an
int key, or with the dict in a closure cell instead of a global, the compiled values are right. In torch_fadjoint
the function was ``RuleOptimizer._momentum_buffer`` (``self.state.get(param, {})``, then ``buf.is_inference()``):
every parameter got the first one's momentum buffer, and ``torch._foreach_add_(bufs, grads)`` failed in fake-tensor
propagation ("Attempting to broadcast a dimension ..."); a net whose parameters share a shape would have been
updated silently wrong.
"""
import torch

KEYS = [torch.zeros(3), torch.ones(3)]
STATE = {key: key + 10 for key in KEYS}


def lookup(key):
    value = STATE[key]
    torch._dynamo.graph_break()  # or: value.is_inference()
    return value


def main() -> int:
    compiled = torch.compile(lookup, backend="eager")
    eager = [lookup(key).tolist() for key in KEYS]
    got = [compiled(key).tolist() for key in KEYS]
    print("eager:   ", eager)
    print("compiled:", got)
    return 0 if got == eager else 1


if __name__ == "__main__":
    raise SystemExit(main())
