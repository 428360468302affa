"""benchmarks.train checkpoint/resume (issue 6): 2 epochs straight == 1 epoch + resume + 1 epoch, bit for bit."""
import pytest
import torch

from benchmarks import train


def _args(data_root, tmp_path, ckpt, epochs, rule, *extra):
    return ["--config", "configs/mnist_mlp.toml", "--data-root", str(data_root), "--train-subset", "600",
            "--widths", "784,32,10", "--epochs", str(epochs), "--rules", rule, "--checkpoint-dir", str(ckpt),
            "--out", str(tmp_path / "out"), "--progress", "false", "--threads", "1", "--schedule", "cosine",
            "--input-noise", "0.05", *extra]


@pytest.mark.parametrize("rule", ["fadjoint", "sgd"])
def test_resume_is_bit_identical(data_root, tmp_path, rule, monkeypatch):
    """With a cosine schedule, momentum, input noise (global RNG) and shuffling (its own generator)."""
    straight, split = tmp_path / "straight", tmp_path / "split"
    train.main(_args(data_root, tmp_path, straight, 2, rule))
    save = train.save_checkpoint

    def save_then_crash(path, state):  # the job dies right after epoch 1's checkpoint
        save(path, state)
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "save_checkpoint", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        train.main(_args(data_root, tmp_path, split, 2, rule))
    monkeypatch.setattr(train, "save_checkpoint", save)
    resumed = train.main(_args(data_root, tmp_path, split, 2, rule, "--resume"))
    a = torch.load(next(straight.iterdir()), weights_only=False)
    b = torch.load(next(split.iterdir()), weights_only=False)
    assert a["epoch"] == b["epoch"] == 2 and len(resumed[0]["history"]) == 2
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    assert a["history"][1]["train_loss"] == b["history"][1]["train_loss"]
    assert torch.equal(torch.cat(a["step_losses"]), torch.cat(b["step_losses"]))


def test_a_crash_mid_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "ck.pt"
    train.save_checkpoint(path, {"epoch": 1})

    def crash(obj, f, *args, **kwargs):
        with open(f, "wb") as fh:
            fh.write(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        train.save_checkpoint(path, {"epoch": 2})
    monkeypatch.undo()
    assert torch.load(path)["epoch"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck.pt"]
