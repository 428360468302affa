"""benchmarks.gpu: the one prepared GPU command, smoke-tested on CPU (its CUDA rows refuse in one line)."""
import json
import math
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch

import torch_fadjoint as tfa
from benchmarks import compare, gpu, speed

ROOT = Path(__file__).resolve().parents[1]


def _cfg(**overrides):
    return {**gpu.DEFAULTS, **gpu.QUICK, "device": "cpu", "quick": True, "progress": False, **overrides}


def _assert_ratio_or_reason(cells):
    """Every row: result "ok" with a finite paired ratio, or a one-line reason and no ratio."""
    for cell in cells:
        assert set(cell["rules"]) == set(gpu.VARIANTS), cell["key"]
        for name, e in cell["rules"].items():
            result = e["result"]
            assert result and "\n" not in result and len(result) <= 300, (cell["key"], name, result)
            if result == "ok":
                assert math.isfinite(e["paired_ratio"]) and e["paired_ratio"] > 0, (cell["key"], name)
                assert e["median_s"] > 0 and e["block_steps"] >= 1
            else:
                assert "paired_ratio" not in e, (cell["key"], name, result)
                assert result.startswith(("refused: ", "not available in this version", "skipped: ", "error",
                                          "no ratio")), result


def test_the_config_file_is_the_defaults():
    """`python -m benchmarks.gpu` and `--config configs/gpu.toml` are the same run: a key that drifts fails."""
    with open(ROOT / "configs" / "gpu.toml", "rb") as fh:
        assert tomllib.load(fh) == gpu.DEFAULTS


def test_device_slug_names_the_results_folder():
    assert gpu.slug("NVIDIA H200") == "nvidia_h200"
    assert gpu.slug("NVIDIA GeForce RTX 4090 (24 GB)") == "nvidia_geforce_rtx_4090_24_gb"
    assert gpu.gpu_environment(torch.device("cpu"))["device_slug"] == "cpu"


def test_cpu_cell_gives_every_row_a_ratio_or_a_one_line_reason():
    """On CPU: the eager variants are timed against autograd, the CUDA graph rows refuse naming the device, the
    library's graphed step is 'not available' until torch_fadjoint has it (then it runs or refuses in one line)."""
    cell = gpu.measure_cell(_cfg(repeats=2, min_repeats=1, warmup=1), [784, 16, 10], 4, torch.device("cpu"),
                            steps_deadline=float("inf"))
    _assert_ratio_or_reason([cell])
    rows = cell["rules"]
    for name in ("sgd", "fadjoint", "fadjoint_novalidate", "fadjoint_async", "fadjoint_fused"):
        assert rows[name]["result"] == "ok", (name, rows[name]["result"])
        assert rows[name]["peak_bytes"] > 0 and rows[name]["peak_ratio"] > 0
    assert rows["sgd"]["paired_ratio"] == 1.0
    assert rows["sgd_graphed"]["result"] == "refused: CUDA graphs need a CUDA device (this run: cpu)"
    assert rows["sgd_compiled"]["result"].startswith("skipped: compile = false")
    if getattr(tfa, "graphed_step", None) is None:
        assert rows["fadjoint_graphed"]["result"] == "not available in this version (torch_fadjoint has no graphed_step)"
    else:
        assert rows["fadjoint_graphed"]["result"].startswith(("refused: ", "ok"))
    assert rows["fadjoint"]["validate"] == "None" and rows["fadjoint_async"]["validate"] == "'async'"


def test_no_variant_is_built_after_the_phase_deadline():
    cell = gpu.measure_cell(_cfg(), [784, 8, 10], 2, torch.device("cpu"), steps_deadline=0.0)
    assert {e["result"] for e in cell["rules"].values()} == {"skipped: time budget (phase 1 ran out within this cell)"}
    assert not gpu._complete(cell)  # a rerun measures it again


def test_a_timed_block_syncs_once_before_and_once_after(monkeypatch):
    """The timed loop reads nothing back per step: two device syncs per block of `block_steps` steps."""
    syncs, steps = [], []
    monkeypatch.setattr(speed, "_sync", lambda device: syncs.append(1))
    entries = {"a": {"times": [], "block_steps": 5, "_step": lambda x, t: steps.append(1)}}
    speed.time_interleaved(entries, 4, 4, 0.0, torch.device("cpu"), None, None)
    assert len(steps) == 20 and len(syncs) == 1 + 4 * 2
    assert entries["a"]["repeats"] == 4 and "_step" not in entries["a"]


def _cell(key, batch, **rows):
    return {"key": key, "batch": batch, "rules": {name: {"result": "ok", **values} for name, values in rows.items()}}


def test_targets_follow_the_measured_ratios():
    """PASS only when every measured cell meets the target, MISS when one does not, unmeasured without a number;
    the graphed target ignores batch > 256, and a graphed step whose check failed does not count."""
    cells = [_cell("m/b16", 16, fadjoint_graphed={"paired_ratio": 0.3, "check_ok": True},
                   fadjoint_async={"paired_ratio": 0.99}, fadjoint={"peak_ratio": 1.0}),
             _cell("m/b1024", 1024, fadjoint_graphed={"paired_ratio": 0.9, "check_ok": True},
                   fadjoint_async={"paired_ratio": 1.01}, fadjoint={"peak_ratio": 0.5})]
    found = {t["key"]: t for t in gpu.evaluate_targets(cells, "cuda")}
    assert found["graphed"]["status"] == "PASS" and len(found["graphed"]["measured"]) == 1
    assert found["async"]["status"] == "MISS" and found["peak"]["status"] == "PASS"
    cells[0]["rules"]["fadjoint_graphed"]["check_ok"] = False
    found = {t["key"]: t for t in gpu.evaluate_targets(cells, "cuda")}
    assert found["graphed"]["status"] == "unmeasured" and found["graphed"]["missing"] == [("m/b16", "check failed")]
    assert gpu._target_line(found["graphed"]).startswith("- **unmeasured**")
    assert gpu._target_line(found["async"]).startswith("- **MISS**") and "over: m/b1024" in gpu._target_line(found["async"])
    refused = [{"key": "m/b1", "batch": 1, "rules": {"fadjoint_graphed": {"result": "refused: no CUDA"}}}]
    assert gpu.evaluate_targets(refused, "cpu")[0]["missing"] == [("m/b1", "refused: no CUDA")]


def test_compare_starts_no_run_after_its_time_limit_and_resumes(data_root, tmp_path):
    """stop_after_s: cached runs are always taken, nothing new starts after the limit, the report says what is
    missing (not 'diverged'), and --resume without a limit finishes the protocol."""
    config = tmp_path / "c.toml"
    config.write_text('datasets = ["mnist"]\nwidths = [784, 16, 10]\nseeds = [0, 1]\nepochs = 1\nvalidation = 0\n'
                      'train_subset = 256\n[variants.a]\nrule = "fadjoint"\n[variants.b]\nrule = "sgd"\n')
    common = ["--config", str(config), "--data-root", str(data_root), "--out", str(tmp_path / "o"), "--progress",
              "false", "--resume"]
    compare.main([*common, "--only", "a"])
    report = compare.main([*common, "--stop-after-s", "1e-9"]).read_text()
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert list(summary["datasets"]["mnist"]) == ["a"] and len(summary["datasets"]["mnist"]["a"]["histories"]) == 2
    assert summary["stopped"]["not_run"] == ["mnist b"] and summary["stopped"]["runs_not_started"] == 2
    assert "Stopped after" in report and "| b |" not in report and "diverged" not in report
    compare.main(common)
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert "stopped" not in summary and len(summary["datasets"]["mnist"]["b"]["histories"]) == 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cuda_device_without_cuda_is_a_one_line_error():
    with pytest.raises(SystemExit, match="no CUDA device here"):
        gpu.main(["--device", "cuda", "--out", "unused", "--progress", "false"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_cell_measures_autograds_graphed_step_and_allocator_peaks():
    cell = gpu.measure_cell(_cfg(device="cuda", repeats=3, min_block_s=0.001), [784, 32, 10], 16,
                            torch.device("cuda"), steps_deadline=float("inf"))
    _assert_ratio_or_reason([cell])
    rows = cell["rules"]
    assert rows["sgd_graphed"]["result"] == "ok" and rows["sgd_graphed"]["check_ok"], rows["sgd_graphed"]
    assert rows["fadjoint"]["cuda_peak_bytes"] > 0 and rows["fadjoint"]["validate"] == "None"
    for name in ("fadjoint_graphed", "fadjoint_compiled"):
        assert rows[name]["result"].startswith(("ok", "refused: ", "not available", "skipped: ")), rows[name]


@pytest.mark.slow
def test_quick_cpu_command_writes_every_phase(tmp_path, data_root):
    """The prepared command end to end (`--device cpu --quick`, ~2 minutes on a loaded 2-core machine): every
    phase's files, a ratio or a reason per row, the environment and command in GPU.md, and target lines that
    agree with the numbers in steps.json (recomputed here, not read from the script's own verdict)."""
    out = tmp_path / "gpu"
    done = subprocess.run([sys.executable, "-m", "benchmarks.gpu", "--device", "cpu", "--quick", "--out", str(out),
                           "--progress", "false", "--budget-s", "400"], cwd=ROOT, capture_output=True, text=True,
                          timeout=900, env={**os.environ, "FADJOINT_DATA": str(data_root)})
    assert done.returncode == 0, done.stderr[-3000:]
    for name in ("GPU.md", "gpu.json", "steps.json", "epochs.json", "compare/summary.json", "compare/REPORT.md"):
        assert (out / name).is_file(), name
    steps = json.loads((out / "steps.json").read_text())
    assert len(steps["results"]) == 2 * 2  # 784-64-10 and examples_mnist x batch 1, 16
    _assert_ratio_or_reason(steps["results"])
    epochs = json.loads((out / "epochs.json").read_text())
    assert [r["rule"] for r in epochs["rules"]] == list(gpu.RULES)
    assert all(r["result"] == "ok" and r["seconds"] > 0 for r in epochs["rules"]), epochs["rules"]
    text = (out / "GPU.md").read_text()
    assert f"torch {torch.__version__}" in text and "driver unknown" in text and "--quick" in text
    for key, _, variant, ratio, at_most, max_batch in gpu.TARGETS:
        values = [c["rules"][variant][ratio] for c in steps["results"]
                  if (max_batch is None or c["batch"] <= max_batch) and c["rules"][variant]["result"] == "ok"
                  and c["rules"][variant].get("check_ok", True)]
        expected = "unmeasured" if not values else ("MISS" if max(values) > at_most else "PASS")
        line = next(line for line in text.splitlines() if f"`{variant}` {ratio}" in line or
                    (expected == "unmeasured" and f"`{variant}`:" in line))
        assert line.startswith(f"- **{expected}**"), (key, values, line)
    # the library has a graphed step: on CPU each cell's row is its one-line refusal, never "not available"
    assert tfa.graphed_step is not None and "torch_fadjoint has no graphed_step" not in text
    for cell in steps["results"]:
        result = cell["rules"]["fadjoint_graphed"]["result"]
        assert result.startswith("refused: graphed_step: CUDA graphs need CUDA tensors"), (cell["key"], result)
        assert f"| {result} |" in text, (cell["key"], result)
    rerun = subprocess.run([sys.executable, "-m", "benchmarks.gpu", "--device", "cpu", "--quick", "--out", str(out),
                            "--progress", "false", "--phases", "steps"], cwd=ROOT, capture_output=True, text=True,
                           timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    again = json.loads((out / "steps.json").read_text())
    assert all(c.get("kept_from_earlier_run") for c in again["results"])  # resumed, not measured again
