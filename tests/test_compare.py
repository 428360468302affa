"""benchmarks.compare --quick end to end on a small subset: files are produced and every rule learns."""
import json

from benchmarks import compare


def test_quick_compare_produces_the_report_and_every_rule_learns(data_root, tmp_path):
    """--quick (3000 training images, 2 epochs, seed 0): every rule's ReLU variant is far above chance.

    Measured (benchmarks/results/cpu_capability; seeds 0-4 x ATEN_CPU_CAPABILITY default / avx2 x {as is,
    init + 1 ulp, MKL_CBWR=COMPATIBLE}): the ReLU variants do not move under a rounding change (seed 0, the
    one run here, within 0.002), and across seeds the worst is il 0.467 (seed 4; 0.548 at seed 0),
    then il_prox 0.527, lfp 0.542, consequentialism_adam 0.748; the rest 0.84-0.90. Floor 0.4 (chance 0.1).
    With every rule's update sign flipped the run stops on a non-finite update (fadjoint, equilibrium) or
    the variant ends at 0.001-0.114.

    lfp_step (Step units, the one chaotic variant) has no floor here: after 48 steps at lr 0.03 it sits at
    0.10-0.25 over seeds 0-9 and the same settings (seed 0: 0.155-0.205; 0.1347 under AVX512, issue 13),
    with no margin above the flipped rule's 0.066-0.103; six epochs leave 0.13 against 0.11. That a Step
    net learns under LFP is asserted by tests/test_lfp.py::test_step_mlp_learns_mnist_subset (median of
    three seeds); here it must run, be reported and give an accuracy in [0, 1] per epoch.
    """
    # --quick sets train_subset = 3000 itself (QUICK wins over --train-subset); say so rather than pass 1500
    report = compare.main(["--config", "configs/compare.toml", "--quick", "--data-root", str(data_root),
                           "--datasets", "mnist", "--train-subset", "3000", "--out", str(tmp_path),
                           "--progress", "false"])
    text = report.read_text()
    summary = json.loads((tmp_path / "summary.json").read_text())
    variants = summary["datasets"]["mnist"]
    assert set(variants) >= {"sgd", "fadjoint", "equilibrium", "lfp", "consequentialism", "nlms", "il", "il_prox"}
    assert summary["config"]["train_subset"] == 3000 and summary["config"]["epochs"] == 2
    for name, res in variants.items():
        accs = [h["test_acc"] for h in res["histories"][0]]
        assert len(accs) == 2 and all(0.0 <= acc <= 1.0 for acc in accs), (name, accs)
        if summary["config"]["variants"][name].get("activation") != "step":  # Step: see the docstring
            assert accs[-1] > 0.4, (name, accs)
        assert f"| {name} |" in text
    for png in ("mnist_accuracy.png", "mnist_wallclock.png", "mnist_selection.png"):
        assert (tmp_path / png).stat().st_size > 1000
    runs = sorted(p.name for p in (tmp_path / "runs").iterdir())
    before = {p: (tmp_path / "runs" / p).stat().st_mtime_ns for p in runs}
    compare.main(["--config", "configs/compare.toml", "--quick", "--resume", "--data-root", str(data_root),
                  "--datasets", "mnist", "--train-subset", "3000", "--out", str(tmp_path), "--progress", "false"])
    assert {p: (tmp_path / "runs" / p).stat().st_mtime_ns for p in runs} == before  # resumed, not re-run


def test_compare_per_variant_seeds_and_epochs(data_root, tmp_path):
    """A [variants.X] table may set its own `seeds` / `epochs` (ablations on fewer seeds); REPORT says so."""
    config = tmp_path / "c.toml"
    config.write_text('datasets = ["mnist"]\nwidths = [784, 16, 10]\nseeds = [0, 1]\nepochs = 2\nvalidation = 0\n'
                      'train_subset = 256\n[variants.a]\nrule = "fadjoint"\n'
                      '[variants.b]\nrule = "fadjoint"\nseeds = [0]\nepochs = 1\n')
    report = compare.main(["--config", str(config), "--data-root", str(data_root), "--out", str(tmp_path / "o"),
                           "--progress", "false"])
    runs = sorted(p.name for p in (tmp_path / "o" / "runs").iterdir())
    assert runs == ["mnist_a_final_default_seed0.json", "mnist_a_final_default_seed1.json",
                    "mnist_b_final_default_seed0.json"]
    text = report.read_text()
    assert "(1 seed, 1 epochs)" in text and "| a |" in text


def test_selection_run_that_diverges_is_recorded_not_raised():
    """A grid point whose rule refuses a non-finite update counts as diverged (never chosen); other errors raise."""
    import pytest

    def boom(msg):
        def make():
            raise RuntimeError(msg)
        return make

    assert compare._diverged_or(boom("grads: non-finite values in entry 4"))["history"] == []
    with pytest.raises(RuntimeError, match="other"):
        compare._diverged_or(boom("other"))
