"""benchmarks.train checkpoint/resume (issue 6): 2 epochs straight == 1 epoch + resume + 1 epoch, bit for bit;
a checkpoint carries the SHA-256 of its payload, and a resume with other hyper-parameters is refused (issue 13)."""
import io
import re
import struct

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
    a = train.load_checkpoint(next(straight.iterdir()))
    b = train.load_checkpoint(next(split.iterdir()))
    assert a["epoch"] == b["epoch"] == 2 and len(resumed[0]["history"]) == 2
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    assert a["history"][1]["train_loss"] == b["history"][1]["train_loss"]
    assert torch.equal(torch.cat(a["step_losses"]), torch.cat(b["step_losses"]))


def test_a_crash_mid_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "ck.pt"
    train.save_checkpoint(path, {"epoch": 1})

    def crash_while_saving(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt

    def crash_before_the_rename(src, dst):  # the temporary file is complete; the rename never happens
        raise KeyboardInterrupt

    for module, name, crash in ((torch, "save", crash_while_saving), (train.os, "replace", crash_before_the_rename)):
        monkeypatch.setattr(module, name, crash)
        with pytest.raises(KeyboardInterrupt):
            train.save_checkpoint(path, {"epoch": 2})
        monkeypatch.undo()
        assert train.load_checkpoint(path)["epoch"] == 1
        assert sorted(p.name for p in tmp_path.iterdir()) == ["ck.pt"]


def _saved(tmp_path):
    path = tmp_path / "ck.pt"
    train.save_checkpoint(path, {"epoch": 3, "w": torch.arange(1000.0)})
    return path, path.read_bytes()


def _one_line_error(path, match):
    with pytest.raises(SystemExit) as info:
        train.load_checkpoint(path)
    message = str(info.value.code)
    assert message.splitlines() == [message] and message.startswith(f"error: {path}: ") and match in message
    return message


def test_flipped_bytes_inside_a_tensor_are_a_one_line_error_naming_the_file(tmp_path):
    path, blob = _saved(tmp_path)
    at = blob.index(struct.pack("<f", 500.0))  # w[500] in the tensor's storage
    flipped = blob[:at] + bytes(b ^ 0xFF for b in blob[at:at + 4]) + blob[at + 4:]
    payload = flipped[flipped.index(b"\n") + 1:]
    assert torch.load(io.BytesIO(payload))["w"][500] != 500  # torch's zip reader alone would not notice
    path.write_bytes(flipped)
    _one_line_error(path, "corrupted or truncated checkpoint (SHA-256 of the payload does not match)")


@pytest.mark.parametrize("keep", [0.5, 0.999])
def test_a_truncated_checkpoint_is_a_one_line_error_naming_the_file(tmp_path, keep):
    path, blob = _saved(tmp_path)
    path.write_bytes(blob[:int(len(blob) * keep)])
    _one_line_error(path, "corrupted or truncated checkpoint")


def test_a_file_that_is_no_checkpoint_is_a_one_line_error_naming_the_file(tmp_path):
    path = tmp_path / "ck.pt"
    torch.save({"epoch": 1}, path)  # a bare torch.save, no header
    _one_line_error(path, "not a benchmarks.train checkpoint (no SHA-256 header)")
    path.write_bytes(b"")
    _one_line_error(path, "not a benchmarks.train checkpoint")


def test_resume_with_other_hyper_parameters_is_refused_naming_each(data_root, tmp_path):
    ckpt = tmp_path / "ck"
    train.main(_args(data_root, tmp_path, ckpt, 1, "fadjoint"))
    saved = next(ckpt.iterdir())
    before = saved.read_bytes()
    with pytest.raises(SystemExit) as info:
        train.main(_args(data_root, tmp_path, ckpt, 2, "fadjoint", "--resume", "--lr", "0.05", "--momentum", "0.5"))
    message = str(info.value.code)
    assert message.splitlines() == [message]
    assert message.startswith(f"error: {saved}: --resume with hyper-parameters other than the checkpoint's: ")
    # epochs is refused too: the cosine schedule's length is part of the checkpoint
    assert "epochs 2 (checkpoint: 1), lr 0.05 (checkpoint: 0.1), momentum 0.5 (checkpoint: 0.9)" in message
    assert saved.read_bytes() == before
    # where a run executes, what it logs and the data's folder may differ
    resumed = train.main(_args(data_root, tmp_path, ckpt, 1, "fadjoint", "--resume", "--data-root", f"{data_root}/.",
                               "--out", str(tmp_path / "elsewhere"), "--progress", "true"))
    assert len(resumed[0]["history"]) == 1


def test_resume_of_a_corrupted_checkpoint_stops_in_one_line(data_root, tmp_path):
    ckpt = tmp_path / "ck"
    train.main(_args(data_root, tmp_path, ckpt, 1, "sgd"))
    saved = next(ckpt.iterdir())
    blob = saved.read_bytes()
    saved.write_bytes(blob[:-100])
    with pytest.raises(SystemExit, match="^" + re.escape(f"error: {saved}: ") + "corrupted or truncated checkpoint"):
        train.main(_args(data_root, tmp_path, ckpt, 2, "sgd", "--resume"))


def test_an_optimizer_loads_a_state_dict_twice():
    """torch's Optimizer.__setstate__ adds "differentiable" to the defaults at the first load; the second load
    (a resumed run that resumes again) must still pass our key check."""
    import copy

    import torch_fadjoint as tfa
    from torch import nn
    net = tfa.FPropagation(nn.Sequential(nn.Linear(3, 2)))
    opt = tfa.optim.FAdjoint(net, lr=0.1, momentum=0.9)
    opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert opt.param_groups[0]["momentum"] == 0.9
