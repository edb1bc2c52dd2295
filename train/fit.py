"""Training, top to bottom: data → model → optimizer and schedule → epochs (mixed precision, gradient
clipping, EMA, early stopping, best and last checkpoints) → temperature scaling → test report.

Runs as one process (`python -m histoserve.train fit`) or as several under torchrun (DDP: DistributedSampler,
BatchNorm over the global batch, metrics averaged over ranks, only rank 0 writes). `last.pt` holds everything needed
to resume exactly at the next epoch: model, optimizer, schedule, grad scaler, EMA, history, RNGs.
"""

from __future__ import annotations

import csv
import json
import math
import os
import random
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm import tqdm

from histoserve.formats.preprocessing import PreprocessSpec
from histoserve.train import distributed
from histoserve.train.augment import training_transform
from histoserve.train.checkpoint import CheckpointMeta, load_checkpoint, save_atomically, save_checkpoint
from histoserve.train.config import FitConfig
from histoserve.train.data import ImageDataset, SplitRatios, data_digest, drop_unreadable, load_splits
from histoserve.train.evaluate import fit_temperature, plot_reliability, plot_training_curves, predict, summarize, write_report
from histoserve.train.model import IMAGENET_MEAN, IMAGENET_STD, Classifier, build_classifier, load_backbone_weights

METRICS_FIELDS = ["epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "val_balanced_accuracy",
                  "lr", "images_per_second", "seconds"]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# Options a resumed run may change: how long it runs and how it uses the machine, not what it learns.
RESUMABLE_CHANGES = {"resume", "epochs", "early_stopping_patience", "workers", "threads", "out"}


def resume_problems(saved: dict, config: FitConfig, world_size: int) -> list[str]:
    """Why `saved` (a last.pt) cannot continue as `config` on `world_size` processes: a resumed run must
    be the run that was interrupted, or its metrics mean nothing."""
    problems = []
    current = asdict(config)
    for name, value in saved.get("config", {}).items():
        if name not in RESUMABLE_CHANGES and current.get(name) != value:
            problems.append(f"--{name.replace('_', '-')} was {value!r}, now {current.get(name)!r}")
    saved_processes = len(saved["rng"])
    if saved_processes != world_size:
        problems.append(f"it ran on {saved_processes} process(es), now {world_size}: each process continues its own "
                        f"random streams and data shard, so resume with torchrun --nproc_per_node={saved_processes}")
    return problems


def parameter_groups(model: Classifier, lr: float, weight_decay: float, backbone_lr_scale: float) -> list[dict]:
    """No weight decay on norm layers and biases; the backbone may learn slower than the new head."""
    groups = {}
    for name, parameter in model.named_parameters():
        head = name.startswith("backbone.fc.")
        decay = parameter.ndim > 1  # conv and linear weights; not BN weights/biases nor any bias
        key = ("head" if head else "backbone", decay)
        groups.setdefault(key, []).append(parameter)
    return [
        {"params": params, "weight_decay": weight_decay if decay else 0.0,
         "lr": lr * (1.0 if part == "head" else backbone_lr_scale), "name": f"{part}/{'decay' if decay else 'no_decay'}"}
        for (part, decay), params in sorted(groups.items())
    ]


def freeze_backbone(model: nn.Module, frozen: bool) -> None:
    """Only the new head learns while frozen (BatchNorm statistics still adapt to the new data)."""
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(not frozen or name.startswith("backbone.fc."))


def make_optimizer(model: nn.Module, lr: float, weight_decay: float, steps: int, warmup_steps: int,
                   kind: str = "adamw", momentum: float = 0.9, backbone_lr_scale: float = 1.0):
    """AdamW (decoupled weight decay) or SGD with Nesterov momentum; linear warmup, then cosine to
    zero, stepped per batch."""
    groups = parameter_groups(model, lr, weight_decay, backbone_lr_scale) if isinstance(model, Classifier) \
        else [{"params": list(model.parameters()), "weight_decay": weight_decay}]
    if kind == "adamw":
        optimizer = torch.optim.AdamW(groups, lr=lr)
    elif kind == "sgd":
        optimizer = torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=True)
    else:
        raise ValueError(f"--optimizer {kind!r} is not one of adamw, sgd")
    warmup = min(steps - 1, max(1, warmup_steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def autocast(amp: str, device: torch.device):
    if amp == "none":
        return nullcontext()
    if amp not in ("bf16", "fp16"):
        raise ValueError(f"--amp {amp!r} is not one of none, bf16, fp16")
    if amp == "fp16" and device.type != "cuda":
        raise ValueError("--amp fp16 needs CUDA; use --amp bf16 on the CPU")
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def train_one_epoch(model, loader, optimizer, schedule, loss_fn, desc: str, *, device: torch.device | str = "cpu",
                    amp: str = "none", scaler=None, clip_grad_norm: float = 0.0, ema=None, channels_last=False,
                    step_losses: list | None = None, show_progress: bool = True) -> dict:
    model.train()
    seen, correct, loss_sum = 0, 0, 0.0
    bar = tqdm(loader, desc=desc, unit="batch", leave=False, disable=None if show_progress else True)
    for images, labels in bar:
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast(amp, device):
            logits = model(images)
            loss = loss_fn(logits.float(), labels)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None and scaler.is_enabled():
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
        else:
            loss.backward()
        if clip_grad_norm > 0:
            nn.utils.clip_grad_norm_(model.parameters(), clip_grad_norm)
        if scaler is not None and scaler.is_enabled():
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        schedule.step()
        if ema is not None:
            ema.update_parameters(model.module if isinstance(model, DistributedDataParallel) else model)
        if step_losses is not None:
            step_losses.append(loss.item())
        seen += len(labels)
        correct += (logits.argmax(1) == labels).sum().item()
        loss_sum += loss.item() * len(labels)
        bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{schedule.get_last_lr()[-1]:.2e}")
    return {"train_loss": loss_sum / max(1, seen), "train_accuracy": correct / max(1, seen), "images": seen}


class RunLog:
    """Prints on rank 0 and keeps the same lines in <out>/train.log."""

    def __init__(self, out: Path, enabled: bool):
        self.enabled, self.path = enabled, out / "train.log"

    def __call__(self, message: str) -> None:
        if self.enabled:
            print(message, flush=True)
            with open(self.path, "a") as log:  # a few lines per epoch: no handle kept open between them
                log.write(message + "\n")


def fit(config: FitConfig) -> dict:
    world = distributed.setup(config.device)
    deterministic = torch.are_deterministic_algorithms_enabled()
    try:
        return _fit(config, world)
    finally:
        torch.use_deterministic_algorithms(deterministic)
        distributed.cleanup(world)


def _fit(config: FitConfig, world: distributed.World) -> dict:
    resumed = check_before_any_work(config, world)
    out, log = start_run_folder(config, world)
    spec = PreprocessSpec(config.resize_size, config.crop_size, config.interpolation)
    data = load_data(config, world, out, log)
    sampler, train_loader = make_train_loader(config, world, data, spec)
    parts = build_training(config, world, data, steps_per_epoch=len(train_loader))
    meta = CheckpointMeta(arch=config.arch, class_names=data.class_names, preprocess=spec, mean=IMAGENET_MEAN,
                          std=IMAGENET_STD, dropout=config.dropout, data_root=str(Path(config.data).resolve()),
                          split_seed=config.seed, config=asdict(config), data_sha256=data.digest)
    history = FitHistory()
    if resumed is not None:
        history = parts.restore(resumed, world)
        log(f"resumed from {config.resume} after epoch {resumed['epoch']}")

    for epoch in range(history.next_epoch, config.epochs + 1):
        if isinstance(sampler, torch.utils.data.DistributedSampler):
            sampler.set_epoch(epoch)
        frozen = epoch <= config.freeze_epochs
        freeze_backbone(parts.model, frozen)
        started = time.perf_counter()
        step_losses: list[float] = []
        row = train_one_epoch(parts.runnable, train_loader, parts.optimizer, parts.schedule, parts.loss_fn,
                              f"epoch {epoch}/{config.epochs}{' (backbone frozen)' if frozen else ''}",
                              device=world.device, amp=config.amp, scaler=parts.scaler, clip_grad_norm=config.clip_grad_norm,
                              ema=parts.ema, channels_last=config.channels_last, step_losses=step_losses,
                              show_progress=world.is_main)
        elapsed = time.perf_counter() - started
        row = validate(epoch, row, elapsed, step_losses, parts, data, spec, world)
        improved = history.record(row)
        log(f"epoch {epoch}/{config.epochs}  loss {row['train_loss']:.4f}  train acc {row['train_accuracy']:.4f}  "
            f"val loss {row['val_loss']:.4f}  val acc {row['val_accuracy']:.4f}  val bal acc {row['val_balanced_accuracy']:.4f}  "
            f"{row['images_per_second']:.0f} img/s  {elapsed:.0f}s")
        if world.is_main:
            with open(out / "steps.csv", "a", newline="") as handle:
                csv.writer(handle).writerows([epoch, i, loss] for i, loss in enumerate(step_losses))
            _write_metrics(out / "metrics.csv", history.rows)
            if improved:
                meta.metrics = {"best_epoch": epoch, "val_accuracy": row["val_accuracy"],
                                "val_balanced_accuracy": row["val_balanced_accuracy"]}
                save_checkpoint(out / "checkpoint.pt", parts.evaluated, meta)
        save_training_state(out / "last.pt", parts, history, config, world)
        if config.early_stopping_patience and history.stale >= config.early_stopping_patience:
            log(f"early stop: no better validation balanced accuracy for {history.stale} epochs")
            break

    if not world.is_main:
        return {}
    plot_training_curves(history.rows, out / "training_curves.png")
    return calibrate_and_report(config, data, spec, out, log)


def check_before_any_work(config: FitConfig, world: distributed.World) -> dict | None:
    """Seeds and threads; every option that cannot work here refused before a file is read. Returns
    the state to resume from, if any."""
    seed_everything(config.seed)
    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    torch.set_num_threads(config.threads or max(1, (os.cpu_count() or 1) // local_processes))
    if config.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    if config.batch_size % world.size:
        raise ValueError(f"--batch-size {config.batch_size} must divide evenly over {world.size} processes")
    if config.amp == "fp16" and world.device.type != "cuda":
        raise ValueError(f"--amp fp16 needs CUDA and this run is on {world.device.type}; use --amp bf16")
    if config.balance == "sampler" and world.distributed:
        raise ValueError("--balance sampler draws on one process; with torchrun use --balance loss")
    resumed = torch.load(config.resume, map_location=world.device, weights_only=False) if config.resume else None
    if resumed is not None and (problems := resume_problems(resumed, config, world.size)):
        raise ValueError(f"--resume {config.resume}: not the same run ({'; '.join(problems)}). Only "
                         f"{', '.join('--' + n.replace('_', '-') for n in sorted(RESUMABLE_CHANGES - {'resume'}))} may change.")
    return resumed


def start_run_folder(config: FitConfig, world: distributed.World) -> tuple[Path, RunLog]:
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    log = RunLog(out, world.is_main)
    if world.is_main:
        (out / "config.json").write_text(json.dumps({**asdict(config), "world_size": world.size}, indent=2))
    log(f"{' '.join(sys.argv)}\nworld size {world.size}, device {world.device}")
    return out, log


def load_data(config: FitConfig, world: distributed.World, out: Path, log: RunLog):
    """The splits; in an ImageFolder every file is decoded once and an unreadable one is listed in
    skipped_files.txt and left out (a manifest's ok rows were decoded by `prepare` already)."""
    data = load_splits(Path(config.data), SplitRatios(config.val_ratio, config.test_ratio), config.seed, config.fold)
    data.digest = data_digest(Path(config.data), data.splits)[1]  # as found, before unreadable files are left out
    if not data.splits["train"] or not data.splits["val"]:
        raise ValueError(f"{config.data}: the train and val splits must not be empty ({ {k: len(v) for k, v in data.splits.items()} })")
    skipped = []
    if not Path(config.data).is_file():
        for name, samples in data.splits.items():
            data.splits[name], errors = drop_unreadable(samples, name)
            skipped += errors
    if skipped and world.is_main:
        (out / "skipped_files.txt").write_text("".join(f"{e}\n" for e in skipped))
        log(f"skipped {len(skipped)} unreadable file(s), listed in {out / 'skipped_files.txt'}:")
        for error in skipped[:10]:
            log(f"  {error}")
    log(f"classes: {data.class_names}")
    for name, per_class in data.counts().items():
        log(f"  {name:5s} {sum(per_class):6d} images  per class {per_class}")
    return data


def class_counts_of(data) -> np.ndarray:
    labels = [s.label for s in data.splits["train"]]
    return np.maximum(np.bincount(labels, minlength=len(data.class_names)), 1)


def make_train_loader(config: FitConfig, world: distributed.World, data, spec: PreprocessSpec):
    train_samples = data.splits["train"]
    labels = [s.label for s in train_samples]
    generator = torch.Generator().manual_seed(config.seed)
    if config.balance == "sampler":  # every class drawn equally often, with replacement
        weights = torch.tensor(1.0 / class_counts_of(data)[labels], dtype=torch.double)
        sampler = torch.utils.data.WeightedRandomSampler(weights, len(labels), replacement=True, generator=generator)
    else:
        # A DistributedSampler with one replica is an ordinary seeded shuffle; with N replicas, rank r
        # takes every N-th index of the same permutation, so N processes see one process' batches.
        sampler = torch.utils.data.DistributedSampler(train_samples, num_replicas=world.size, rank=world.rank,
                                                      shuffle=True, seed=config.seed, drop_last=True)
    local_batch = config.batch_size // world.size
    loader = torch.utils.data.DataLoader(
        ImageDataset(train_samples, training_transform(config.augment, spec)), batch_size=local_batch,
        sampler=sampler, drop_last=len(train_samples) // world.size > local_batch, num_workers=config.workers,
        generator=generator, pin_memory=world.device.type == "cuda",
    )
    return sampler, loader


@dataclass
class Training:
    """What trains: the model (and its DDP/compiled wrapper), EMA, optimizer, schedule, scaler, loss."""

    model: nn.Module
    runnable: nn.Module
    ema: AveragedModel | None
    optimizer: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    loss_fn: nn.Module

    @property
    def evaluated(self) -> nn.Module:
        """The weights that are validated, checkpointed and exported: the EMA when on."""
        return self.ema.module if self.ema is not None else self.model

    def restore(self, state: dict, world: distributed.World) -> FitHistory:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        set_rng_state(state["rng"][world.rank])
        return FitHistory(state["history"], state["best"], state["stale"], state["epoch"] + 1)


def build_training(config: FitConfig, world: distributed.World, data, steps_per_epoch: int) -> Training:
    backbone_state = load_backbone_weights(config.arch, config.weights, config.weights_cache)
    model = build_classifier(config.arch, len(data.class_names), config.dropout, backbone_state)
    model = distributed.global_batchnorm(model, world)  # BN statistics over the global batch
    model.to(world.device)
    if config.channels_last:
        model.to(memory_format=torch.channels_last)
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(config.ema_decay), use_buffers=True) \
        if config.ema_decay > 0 else None
    trained = DistributedDataParallel(
        model, device_ids=[world.device.index] if world.device.type == "cuda" else None,
        find_unused_parameters=config.freeze_epochs > 0,  # frozen backbone parameters get no gradient
    ) if world.distributed else model
    runnable = torch.compile(trained) if config.compile else trained
    optimizer, schedule = make_optimizer(
        model, config.lr, config.weight_decay, config.epochs * steps_per_epoch,
        int(config.warmup_epochs * steps_per_epoch), config.optimizer, config.momentum, config.backbone_lr_scale)
    scaler = torch.amp.GradScaler("cuda", enabled=config.amp == "fp16" and world.device.type == "cuda")
    class_weights = None
    if config.balance == "loss":  # inverse frequency, mean weight 1
        counts = class_counts_of(data)
        class_weights = torch.tensor(len(data.splits["train"]) / (len(counts) * counts), dtype=torch.float32, device=world.device)
    loss_fn = nn.CrossEntropyLoss(weight=class_weights, label_smoothing=config.label_smoothing)
    return Training(model, runnable, ema, optimizer, schedule, scaler, loss_fn)


@dataclass
class FitHistory:
    """The run so far: one row per epoch, the best validation balanced accuracy, epochs since it."""

    rows: list[dict] = field(default_factory=list)
    best: float = -1.0
    stale: int = 0
    next_epoch: int = 1

    def record(self, row: dict) -> bool:
        """Add an epoch's row; True when it is the best so far."""
        self.rows.append(row)
        improved = row["val_balanced_accuracy"] > self.best
        self.best, self.stale = (row["val_balanced_accuracy"], 0) if improved else (self.best, self.stale + 1)
        return improved


def validate(epoch: int, trained: dict, elapsed: float, step_losses: list[float], parts: Training, data,
             spec: PreprocessSpec, world: distributed.World) -> dict:
    """The epoch's metrics row: training figures averaged over processes, validation of the
    evaluated weights with the training objective (label smoothing, class weights) as its loss."""
    train_loss, train_accuracy = distributed.all_reduce_mean([trained["train_loss"], trained["train_accuracy"]], world)
    step_losses[:] = distributed.all_reduce_mean(step_losses, world)
    predictions = predict(parts.evaluated, data.splits["val"], spec, desc="validating", device=world.device)
    val = summarize(predictions, data.class_names)
    val_loss = float(parts.loss_fn(torch.from_numpy(predictions.logits).float().to(world.device),
                                   torch.from_numpy(predictions.labels).to(world.device)))
    return {"epoch": epoch, "train_loss": train_loss, "train_accuracy": train_accuracy, "val_loss": val_loss,
            "val_accuracy": val["accuracy"], "val_balanced_accuracy": val["balanced_accuracy"],
            "lr": parts.schedule.get_last_lr()[-1], "images_per_second": trained["images"] * world.size / elapsed,
            "seconds": elapsed}


def save_training_state(path: Path, parts: Training, history: FitHistory, config: FitConfig, world: distributed.World) -> None:
    """last.pt: everything an exact resume needs, with every rank's RNG state (gathered), so a
    resumed run continues each process' own random streams."""
    states = [rng_state()]
    if world.distributed:
        states = [None] * world.size
        torch.distributed.all_gather_object(states, rng_state())
    if world.is_main:
        save_atomically({"model": parts.model.state_dict(), "optimizer": parts.optimizer.state_dict(),
                          "schedule": parts.schedule.state_dict(), "scaler": parts.scaler.state_dict(),
                          "ema": parts.ema.state_dict() if parts.ema is not None else None,
                          "epoch": history.rows[-1]["epoch"], "history": history.rows, "best": history.best,
                          "stale": history.stale, "rng": states, "config": asdict(config)}, path)


def calibrate_and_report(config: FitConfig, data, spec: PreprocessSpec, out: Path, log: RunLog) -> dict:
    """With the best checkpoint: a softmax temperature fitted on validation, then the test report."""
    model, meta = load_checkpoint(out / "checkpoint.pt")
    if config.calibrate:
        val_predictions = predict(model, data.splits["val"], spec, desc="calibrating")
        before = summarize(val_predictions, data.class_names)["ece"]
        meta.temperature = val_predictions.temperature = fit_temperature(val_predictions)
        plot_reliability(val_predictions, out / "val_reliability.png", f"validation after temperature {meta.temperature:.2f}")
        log(f"temperature {meta.temperature:.3f} (validation ECE {before:.4f} → {summarize(val_predictions, data.class_names)['ece']:.4f})")
    test_predictions = predict(model, data.splits["test"], spec)
    test_predictions.temperature = meta.temperature
    test = write_report(test_predictions, data.class_names, out, "test")
    meta.metrics.update(test_accuracy=test["accuracy"], test_balanced_accuracy=test["balanced_accuracy"],
                        test_images=test["images"], test_ece=test["ece"])
    save_checkpoint(out / "checkpoint.pt", model, meta)
    log(f"checkpoint: {out / 'checkpoint.pt'}  (best epoch {meta.metrics['best_epoch']}, "
        f"val acc {meta.metrics['val_accuracy']:.4f}, test acc {test['accuracy']:.4f})")
    return meta.metrics


def _write_metrics(path: Path, history: list[dict]) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=METRICS_FIELDS)
        writer.writeheader()
        writer.writerows(history)
