"""benchmarks.train under torchrun (issue 6): 2 CPU ranks, the F-adjoint with tfa.distributed follows
autograd SGD with DistributedDataParallel step for step (float64). Slow: two processes load torch and MNIST."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_torchrun_two_ranks_fadjoint_follows_ddp(data_root, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "benchmarks.train", "--data-root", str(data_root), "--dtype", "float64",
           "--widths", "784,32,10", "--train-subset", "1024", "--batch-size", "32", "--epochs", "2",
           "--momentum", "0.9", "--rules", "fadjoint,sgd", "--threads", "1", "--progress", "false",
           "--out", str(tmp_path / "out"), "--checkpoint-dir", str(tmp_path / "ck")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    sgd = json.loads((tmp_path / "out" / "mnist_sgd_seed0.json").read_text())
    assert sgd["max_step_loss_diff_vs_fadjoint"] <= 1e-9
    steps = len(sgd["history"]) * (1024 // (32 * 2))
    assert sgd["history"][-1]["epoch"] == 2 and len(sgd["step_loss_last"]) == 5 and steps == 32
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["mnist_fadjoint_seed0.pt", "mnist_sgd_seed0.pt"]
    assert done.stdout.count("fadjoint") == 1  # the table is printed by rank 0 only
