"""Before/after a change to the library, in one interleaved ``benchmarks.speed`` run (issue 16).

    git archive <before-commit> torch_fadjoint | tar -x -C runs/base && mv runs/base/torch_fadjoint runs/base/torch_fadjoint_base
    OMP_WAIT_POLICY=PASSIVE python -m benchmarks.before_after --config configs/speed_target.toml \\
        --rules sgd,fadjoint,fadjoint_fused_before,fadjoint_fused --out runs/speed_target_before_after

``fadjoint_before`` / ``fadjoint_fused_before`` are ``fadjoint`` / ``fadjoint_fused`` built from the copy of the
package under ``runs/base/torch_fadjoint_base`` (its imports are relative, so it loads beside the working tree's);
their paired ratios to ``sgd`` and to the new rules come from the same interleaved repetitions.
"""
import sys

from . import rules as R, speed

sys.path.insert(0, "runs/base")
import torch_fadjoint_base as tfa_base  # noqa: E402


class BaseRuleTrainer(R.RuleTrainer):
    def __init__(self, model, make_optimizer):
        self.model = model
        self.net = tfa_base.FPropagation(model)
        self.opt = make_optimizer(self.net)


R.RULES["fadjoint_before"] = lambda model, cfg: BaseRuleTrainer(model, lambda net: tfa_base.optim.FAdjoint(
    net, **R._sgd_kwargs(cfg)))
R.RULES["fadjoint_fused_before"] = lambda model, cfg: BaseRuleTrainer(model, lambda net: tfa_base.optim.FAdjoint(
    net, **R._sgd_kwargs(cfg), fuse_update=True))

if __name__ == "__main__":
    speed.main(sys.argv[1:])
