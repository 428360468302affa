"""Train a model on MNIST / Fashion-MNIST with several learning rules from the same seed.

    python -m benchmarks.train --config configs/mnist_mlp.toml [--key value ...]
    python -m benchmarks.train --config configs/mnist_cnn.toml [--dropout false --tag nodrop]

``model`` picks the network (``benchmarks/models.py``): the MLP of ``widths`` (default), pytorch/examples'
MNIST ``Net`` (``examples_mnist``) or a small CNN (``small_cnn``); images are reshaped to (N, 1, 28, 28)
for the CNNs. ``resnet20`` (He et al.'s CIFAR ResNet-20) and ``resnet18_tv`` (torchvision's ResNet-18) take the
data set's images too and need ``graph = true``: every library rule's ``FPropagation`` then records the whole
graph on a tape (``FPropagation(model, graph=True)``, docs/maths.md §7.1; ``configs/resnet.toml``).
``optimizer`` picks the torch optimizer of the ``autograd`` and ``fadjoint_dropin`` rules (``sgd``,
``adadelta``, ``adam``); ``schedule = "step"`` is ``StepLR(lr_step_size, lr_gamma)``.

Every rule in ``rules`` (see ``benchmarks/rules.py``: ``fadjoint``, autograd ``sgd``, …) starts from
the same initial weights and sees the same batches. Data are held as tensors on the device and
batched by a permutation. Prints a table, writes one JSON per (rule, seed) to ``out``, and reports
how far each rule's per-step losses are from the first rule's (the F-adjoint vs autograd check).

Data parallel: ``torchrun --nproc_per_node=N -m benchmarks.train ...`` (env RANK/WORLD_SIZE) starts a
gloo (CPU) or NCCL (CUDA, one device per LOCAL_RANK) group; every rank draws the same permutation and
takes its strided share of each global batch of ``batch_size × N`` (``batch_size`` is per rank, as
with DDP; the ragged tail is dropped). The ``tfa.optim`` rules average through
``FPropagation(process_group=...)`` (``torch_fadjoint.distributed``), ``sgd`` through DDP. Only rank 0
logs, writes results and checkpoints.

Checkpoints: with ``--checkpoint-dir`` the model, optimizer, scheduler, epoch, RNG states and the batch
generator are saved after every epoch (temp file + ``os.replace``), behind a header holding the SHA-256 of
the payload; ``--resume`` verifies it (a corrupted or truncated file is a one-line error naming the file),
refuses hyper-parameters that differ from the checkpoint's (naming each), and continues from it.
"""
from __future__ import annotations

import hashlib
import io
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from torch_fadjoint import data as tfa_data

from .common import DTYPES, environment, parse_config, write_json
from .models import build_model, input_shape
from .rules import build_trainer

DEFAULTS = {
    "dataset": "mnist",
    "datasets": [],  # several data sets in one command (overrides `dataset`)
    "data_root": "",
    "model": "mlp",  # "mlp" | "examples_mnist" | "examples_mnist_modules" | "small_cnn" | "resnet20" | "resnet18_tv"
    "image_shape": [],  # the ResNets' input [C, H, W]; empty: the data set's (benchmarks/models.py)
    "graph": False,  # true: every library rule's FPropagation records the whole graph (tfa tape; the ResNets need it)
    "widths": [784, 256, 10],
    "activation": "relu",
    "channels": [8, 16], "kernels": [5, 3], "strides": [2, 1], "pools": ["max", "avg"], "hidden": [],  # small_cnn
    "dropout": True,  # false: every Dropout's p = 0 (the F-adjoint then equals autograd step for step)
    "output_activation": "",
    "init": "default",
    "input_noise": 0.0,
    "normalize": True,
    "loss": "cross_entropy",
    "reduction": "mean",
    "rules": ["fadjoint", "sgd"],
    "rule": "",  # --rule NAME: shorthand for --rules NAME
    "variants": {},  # [variants.NAME] tables (rule = ..., overrides): run instead of `rules` when present
    "select_epochs": 0, "thresholds": [0.97, 0.85],  # benchmarks.compare's keys, ignored here (shared configs)
    "optimizer": "sgd",  # the torch optimizer of the autograd / fadjoint_dropin rules: sgd | adadelta | adam
    "lr": 0.1,
    "momentum": 0.0,
    "weight_decay": 0.0,
    "nesterov": False,
    "schedule": "constant",  # "constant" | "cosine" (CosineAnnealingLR over the epochs) | "step" (StepLR)
    "lr_step_size": 1, "lr_gamma": 0.7,  # schedule = "step": StepLR(step_size, gamma), stepped every epoch
    "batch_size": 128,
    "test_batch_size": 4096,
    "epochs": 1,
    "seeds": [0],
    "dtype": "float32",
    "device": "cpu",
    "threads": 0,
    "validation": 0,
    "train_subset": 0,
    "test_subset": 0,  # > 0: test on the first N test images only (quick checks)
    "download": True,
    "out": "runs/train",  # with --config FILE: runs/<FILE's name> (benchmarks/results/: --out only)
    "tag": "",
    "progress": True,
    "save_step_losses": False,  # true: every step's loss in the JSON (`step_losses`), not only the first and last 5
    "validate": True,
    "checkpoint_dir": "",  # save model, optimizer, scheduler, epoch and RNG states there after every epoch
    "resume": False,       # continue each run from its checkpoint in checkpoint_dir
    # rule-specific knobs (benchmarks/rules.py reads them; other rules ignore them)
    "tau": 0.1, "steps": 100, "sequential": True, "relax_init": "forward",   # equilibrium (§2)
    "reference_output_derivative": False, "relaxation": "closed_form",
    "clip_norm": 3.0, "reward": "softmax", "eps": 1e-6, "batch_reduction": "mean",  # lfp (§3)
    "base": "sgd", "delta_rel": 1e-3, "positions": "sum",                      # consequentialism, nlms (§4, §7.3)
    "T": 25, "gamma_top": -1.0, "gamma_bot": -1.0, "clamp": 1.0,              # il, il_prox (§5); γ < 0: defaults
    "alpha": 5.0, "prox_eps": 0.25,
}


@torch.no_grad()
def accuracy(model, split: tfa_data.TensorDataset, batch_size: int = 4096) -> float:
    """Top-1 accuracy of ``model`` (eval mode, no records) on a tensor split."""
    was_training = model.training
    model.eval()
    correct = torch.zeros((), dtype=torch.long, device=split.x.device)
    for x, t in split.batches(batch_size, shuffle=False):
        correct += (model(x).argmax(1) == t).sum()
    model.train(was_training)
    return correct.item() / len(split)


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: dict):
    """The per-epoch learning-rate schedule named by ``cfg["schedule"]`` (None for "constant")."""
    if cfg["schedule"] == "constant":
        return None
    if cfg["schedule"] == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg["epochs"])
    if cfg["schedule"] == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg["lr_step_size"], gamma=cfg["lr_gamma"])
    raise SystemExit(f"error: schedule must be 'constant', 'cosine' or 'step', got {cfg['schedule']!r}")


def run(cfg: dict, rule: str, seed: int, splits: dict, device: torch.device, position: int = 0,
        name: str | None = None) -> dict:
    """Train one rule from one seed; returns the per-epoch record and the per-step losses.

    With ``checkpoint_dir`` the state after every epoch is saved (atomically) to
    ``<checkpoint_dir>/<dataset>_<name>_seed<seed>.pt``; with ``resume`` the run continues from it.
    """
    dtype = DTYPES[cfg["dtype"]]
    torch.manual_seed(seed)
    model = build_model(cfg).to(device=device, dtype=dtype)
    trainer = build_trainer(rule, model, cfg)
    scheduler = make_scheduler(trainer.opt, cfg)
    batches = torch.Generator().manual_seed(seed)
    rank, world = _rank_world()
    train = splits["train"]
    steps_per_epoch = -(-len(train) // (cfg["batch_size"] * world))
    history, step_losses, first_epoch = [], [], 1
    checkpoint = (Path(cfg["checkpoint_dir"]) / f"{cfg['tag'] + '_' if cfg['tag'] else ''}{cfg['dataset']}_"
                  f"{name or rule}_seed{seed}.pt") if cfg["checkpoint_dir"] else None
    if checkpoint is not None and cfg["resume"] and checkpoint.exists():
        state = load_checkpoint(checkpoint, map_location=device)
        check_resume_config(checkpoint, state["config"], cfg)
        model.load_state_dict(state["model"])
        trainer.load_state_dict(state["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        if device.type == "cuda" and state.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(state["cuda_rng"], device)
        batches.set_state(state["batches"])
        history, step_losses, first_epoch = state["history"], state["step_losses"], state["epoch"] + 1
    bar = tqdm(total=cfg["epochs"] * steps_per_epoch, initial=(first_epoch - 1) * steps_per_epoch,
               desc=f"{name or rule} seed {seed}", position=position, leave=False,
               disable=not cfg["progress"] or rank != 0, file=sys.stderr)
    for epoch in range(first_epoch, cfg["epochs"] + 1):
        model.train()
        losses = []
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        for x, t in _batches(train, cfg["batch_size"], batches, rank, world):
            losses.append(trainer.step(x, t))
            bar.update()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
        if scheduler is not None:
            scheduler.step()
        epoch_losses = torch.stack(losses).double().cpu()
        step_losses.append(epoch_losses)
        record = {"epoch": epoch, "train_loss": epoch_losses.mean().item(), "seconds": seconds,
                  "test_acc": accuracy(model, splits["test"], cfg["test_batch_size"])}
        if "val" in splits:
            record["val_acc"] = accuracy(model, splits["val"], cfg["test_batch_size"])
        history.append(record)
        bar.set_postfix(loss=f"{record['train_loss']:.4f}", acc=f"{record['test_acc']:.4f}")
        if checkpoint is not None and rank == 0:
            save_checkpoint(checkpoint, {
                "epoch": epoch, "model": model.state_dict(), "optimizer": trainer.state_dict(),
                "scheduler": None if scheduler is None else scheduler.state_dict(),
                "rng": torch.get_rng_state(), "batches": batches.get_state(),
                "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                "history": history, "step_losses": step_losses, "config": cfg})
    bar.close()
    return {"rule": rule, "seed": seed, "history": history, "step_losses": torch.cat(step_losses)}


CHECKPOINT_HEADER = b"torch_fadjoint checkpoint sha256="  # + 64 hex digits of the payload's SHA-256 + b"\n"
# Keys that may differ between a run and the checkpoint it resumes: where it runs, what it logs, which runs it
# makes. Every other key is a hyper-parameter of the run (epochs too, unless the schedule is constant).
NOT_HYPERPARAMETERS = {"command", "resume", "progress", "out", "checkpoint_dir", "data_root", "download", "device",
                       "test_batch_size", "beside",
                       "threads", "validate", "seeds", "rules", "rule", "datasets", "variants", "tag", "only",
                       "quick", "select_epochs", "thresholds", "speed_results", "save_step_losses"}


def save_checkpoint(path: Path, state: dict) -> None:
    """The header (SHA-256 of the payload) and the ``torch.save`` payload, written to a temporary file beside
    ``path``, then ``os.replace``: a crash never leaves half a file."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    payload = buffer.getvalue()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        tmp.write_bytes(CHECKPOINT_HEADER + hashlib.sha256(payload).hexdigest().encode() + b"\n" + payload)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_checkpoint(path: Path, map_location=None) -> dict:
    """A checkpoint written by :func:`save_checkpoint`, its hash verified first; anything else is a one-line error."""
    blob = Path(path).read_bytes()
    header_end = len(CHECKPOINT_HEADER) + 64
    if not blob.startswith(CHECKPOINT_HEADER) or blob[header_end:header_end + 1] != b"\n":
        raise SystemExit(f"error: {path}: not a benchmarks.train checkpoint (no SHA-256 header)")
    payload = blob[header_end + 1:]
    if hashlib.sha256(payload).hexdigest().encode() != blob[len(CHECKPOINT_HEADER):header_end]:
        raise SystemExit(f"error: {path}: corrupted or truncated checkpoint (SHA-256 of the payload does not match)")
    try:
        return torch.load(io.BytesIO(payload), map_location=map_location, weights_only=False)
    except Exception as exc:  # noqa: BLE001 - the hash matched, so the writer's torch cannot read it here
        cause = " ".join(str(exc).split())
        raise SystemExit(f"error: {path}: unreadable checkpoint ({type(exc).__name__}: {cause})") from None


def check_resume_config(path: Path, saved: dict, cfg: dict) -> None:
    """Refuse to resume with hyper-parameters other than the checkpoint's, naming each one."""
    ignored = NOT_HYPERPARAMETERS | ({"epochs"} if cfg["schedule"] == saved.get("schedule") == "constant" else set())
    absent = "(absent)"
    # a key the checkpoint's config lacks (written before the key existed) had its default's meaning
    def saved_value(key):
        return saved.get(key, DEFAULTS.get(key, absent))

    differ = [f"{key} {cfg.get(key, absent)!r} (checkpoint: {saved_value(key)!r})"
              for key in sorted((set(saved) | set(cfg)) - ignored) if saved_value(key) != cfg.get(key, absent)]
    if differ:
        raise SystemExit(f"error: {path}: --resume with hyper-parameters other than the checkpoint's: "
                         f"{', '.join(differ)}; use the checkpoint's values or another --checkpoint-dir")


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _batches(train: tfa_data.TensorDataset, batch_size: int, generator: torch.Generator, rank: int, world: int):
    """The epoch's batches; under torchrun each rank takes its strided share of every global batch
    (same permutation on every rank, as DistributedSampler with a shared seed)."""
    if world == 1:
        yield from train.batches(batch_size, generator=generator)
        return
    order = torch.randperm(len(train), generator=generator).to(train.x.device)
    global_batch = batch_size * world
    for begin in range(0, len(order) - global_batch + 1, global_batch):  # drop the ragged tail
        idx = order[begin:begin + global_batch][rank::world]
        yield train.x[idx], train.t[idx]


def load_splits(cfg: dict, device: torch.device) -> dict:
    try:
        splits = tfa_data.load(cfg["dataset"], cfg["data_root"] or None, device=device, dtype=DTYPES[cfg["dtype"]],
                               normalize=cfg["normalize"], validation=cfg["validation"], download=cfg["download"])
    except (tfa_data.DatasetNotFoundError, ValueError) as exc:  # ValueError: a data set the data module lacks
        raise SystemExit(f"error: {exc}") from None
    if cfg["train_subset"]:
        train = splits["train"]
        splits["train"] = tfa_data.TensorDataset(train.x[:cfg["train_subset"]], train.t[:cfg["train_subset"]])
    if cfg.get("test_subset"):
        test = splits["test"]
        splits["test"] = tfa_data.TensorDataset(test.x[:cfg["test_subset"]], test.t[:cfg["test_subset"]])
    shape = input_shape(cfg)  # the data helper gives (N, 784); the CNNs take (N, 1, 28, 28)
    if cfg.get("model", "mlp") == "mlp":
        return splits
    return {name: tfa_data.TensorDataset(split.x.reshape(len(split), *shape), split.t) for name, split in splits.items()}


def main(argv=None) -> list[dict]:
    cfg = parse_config(DEFAULTS, __doc__.splitlines()[1], argv)
    if cfg["rule"]:
        cfg["rules"] = [cfg["rule"]]
    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    device = torch.device(cfg["device"])
    own_group = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized()  # under torchrun
    if own_group:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
    try:
        results = []
        for dataset in cfg["datasets"] or [cfg["dataset"]]:
            results += _train_dataset({**cfg, "dataset": dataset}, device)
        if _rank_world()[0] == 0:
            _print_table(results)
        return results
    finally:
        if own_group:
            dist.destroy_process_group()


def _train_dataset(cfg: dict, device: torch.device) -> list[dict]:
    splits = load_splits(cfg, device)
    env = environment(device)
    out_dir = Path(cfg["out"])
    results = []
    for seed in cfg["seeds"]:
        reference = None
        for name, rule, rcfg in _runs(cfg):
            if seed not in rcfg["seeds"]:
                continue  # a variant with its own `seeds` (benchmarks.compare's convention)
            result = run(rcfg, rule, seed, splits, device, name=name)
            result["variant"] = name
            losses = result.pop("step_losses")
            if reference is None:
                reference = (name, losses)
            else:
                result["max_step_loss_diff_vs_" + reference[0]] = (losses - reference[1]).abs().max().item()
            payload = {**result, "config": rcfg, "environment": env,
                       "step_loss_first": losses[:5].tolist(), "step_loss_last": losses[-5:].tolist()}
            if cfg.get("save_step_losses"):
                payload["step_losses"] = losses.tolist()
            file = f"{cfg['tag'] + '_' if cfg['tag'] else ''}{cfg['dataset']}_{name}_seed{seed}.json"
            if _rank_world()[0] == 0:  # log from rank 0 only
                write_json(out_dir / file, payload)
            results.append(payload)
    return results


def _runs(cfg: dict) -> list[tuple[str, str, dict]]:
    """(name, rule, config) per run: the ``rules`` list, or each ``[variants.NAME]`` with its overrides.

    A variant's ``grid`` is benchmarks.compare's selection; here the config's base value is used.
    """
    if not cfg["variants"]:
        return [(rule, rule, cfg) for rule in cfg["rules"]]
    return [(name, spec.get("rule", name), {**cfg, **{k: v for k, v in spec.items() if k not in ("rule", "grid")}})
            for name, spec in cfg["variants"].items()]


def _print_table(results: list[dict]) -> None:
    print(f"\n{'rule':<18}{'seed':>5}{'test acc':>10}{'best':>8}{'loss':>10}{'s/epoch':>9}  max |Δloss| vs first rule")
    for r in results:
        last = r["history"][-1]
        best = max(h["test_acc"] for h in r["history"])
        per_epoch = sum(h["seconds"] for h in r["history"]) / len(r["history"])
        diff = next((v for k, v in r.items() if k.startswith("max_step_loss_diff")), None)
        print(f"{r.get('variant', r['rule']):<18}{r['seed']:>5}{last['test_acc']:>10.4f}{best:>8.4f}{last['train_loss']:>10.4f}"
              f"{per_epoch:>9.2f}  {'' if diff is None else f'{diff:.2e}'}")


if __name__ == "__main__":
    main()
