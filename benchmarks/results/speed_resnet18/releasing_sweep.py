"""What the peak of configs/speed_resnet18.toml's F-adjoint step would be if the tape's sweep freed each op's saved
tensors once its adjoints are made (as autograd frees a node's saved variables, and as the chain sweep does).

    python benchmarks/results/speed_resnet18/releasing_sweep.py

An experiment, not the library: ``torch_fadjoint.tape.tape_grads`` is replaced, for this process only, by a copy
that pops each op off the tape and drops its ``saved`` and ``versions`` (which hold the saved tensors too) before
the next op; the arithmetic is the same. Prints ``peak_step_bytes`` (benchmarks.speed's dispatch-mode count) of
autograd + SGD and of the F-adjoint step, with the library's sweep and with the releasing one.
"""
from __future__ import annotations

import sys
import tomllib
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[2]))  # the repository root

import torch  # noqa: E402

import torch_fadjoint.recorder as recorder  # noqa: E402
from benchmarks import speed  # noqa: E402


def releasing_tape_grads(tape, out_adj):
    for op in tape.ops:  # the library's version check, unchanged
        for tensor, version in op.versions:
            if tensor._version != version:
                raise RuntimeError("a saved tensor was modified in place")
    adjoints, grads = {tape.output: out_adj}, {}
    ops, tape.ops = tape.ops, []
    while ops:
        op = ops.pop()
        outs = [adjoints.pop(i, None) if i >= 0 else None for i in op.outputs]
        saved, op.saved, op.versions = op.saved, None, None
        if all(o is None for o in outs):
            continue
        found = op.entry.input_adjoints(saved, outs[0] if op.single else tuple(outs))
        del saved, outs
        for key, adjoint in found.items():
            source = op.inputs.get(key)
            if source is None or adjoint is None:
                continue
            kind, target = source
            if kind == "value":
                adjoints[target] = adjoint if target not in adjoints else adjoints[target] + adjoint
            elif target.requires_grad:
                grads[target] = adjoint if target not in grads else grads[target] + adjoint
        del found, op
    return grads


def main() -> None:
    cfg = {**speed.DEFAULTS, **tomllib.loads(Path("configs/speed_resnet18.toml").read_text())}
    torch.set_num_threads(cfg["threads"])
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(cfg["batches"][0], *cfg["image_shape"], generator=gen)
    target = torch.randint(0, 10, (cfg["batches"][0],), generator=gen)
    library = recorder.tape_grads
    print("| sweep | rule | peak MiB of a step |\n|---|---|---|")
    for name, sweep in (("library (tape.tape_grads)", library), ("releasing (this file)", releasing_tape_grads)):
        recorder.tape_grads = sweep
        for rule in ("sgd", "fadjoint"):
            model, trainer = speed._make(cfg, rule, cfg["models"][0], torch.device("cpu"), torch.float32)
            for _ in range(2):
                trainer.step(x, target)
            peak = speed.peak_step_bytes(trainer, x, target)["peak_bytes"]
            print(f"| {name} | {rule} | {peak / 2 ** 20:.2f} |")
    recorder.tape_grads = library


if __name__ == "__main__":
    main()
