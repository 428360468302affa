"""The learning rules on the shared sweep (equilibrium F-adjoint, LFP, consequentialism / NLMS, inference learning) that ``torch_fadjoint.optim`` wraps."""
