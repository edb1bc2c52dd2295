"""Process-group set-up for `torchrun` (one node with several GPUs, or several nodes through its
rendezvous). A plain `python -m histoserve.train fit` is a world of one and touches none of this."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int
    size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def setup(device: str = "auto") -> World:
    size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"--device {device!r} is not one of: auto, cpu, cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda, but no CUDA device is visible to torch (use --device cpu or auto)")
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    chosen = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(chosen)
    if size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return World(rank, size, local_rank, chosen)


def all_reduce_mean(values: list[float], world: World) -> list[float]:
    if not world.distributed:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=world.device)
    dist.all_reduce(tensor)
    return (tensor / world.size).tolist()


def cleanup(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()


class CrossProcessBatchNorm2d(torch.nn.BatchNorm2d):
    """BatchNorm over the global batch for CPU (gloo) runs, where PyTorch's SyncBatchNorm has no
    kernel: per-channel sums and sums of squares are all-reduced (differentiably) in training mode,
    so N processes normalise exactly as one process with the whole batch would."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or not dist.is_initialized():
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        count = torch.tensor([x.numel() / x.shape[1]], dtype=x.dtype, device=x.device)
        totals = all_reduce(torch.cat([x.sum((0, 2, 3)), (x * x).sum((0, 2, 3)), count]))
        channels = x.shape[1]
        n = totals[-1]
        mean = totals[:channels] / n
        var = totals[channels:2 * channels] / n - mean * mean
        with torch.no_grad():
            self.num_batches_tracked += 1
            momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
            self.running_mean.mul_(1 - momentum).add_(mean.detach(), alpha=momentum)
            self.running_var.mul_(1 - momentum).add_(var.detach() * n / (n - 1), alpha=momentum)
        shape = (1, channels, 1, 1)
        normalized = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        return normalized * self.weight.view(shape) + self.bias.view(shape)


def global_batchnorm(model: torch.nn.Module, world: World) -> torch.nn.Module:
    """BatchNorm statistics over all processes: SyncBatchNorm on CUDA, CrossProcessBatchNorm2d on CPU."""
    if not world.distributed:
        return model
    if world.device.type == "cuda":
        return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for name, child in model.named_children():
        if type(child) is torch.nn.BatchNorm2d:
            replacement = CrossProcessBatchNorm2d(child.num_features, child.eps, child.momentum, child.affine,
                                                  child.track_running_stats)
            replacement.load_state_dict(child.state_dict())
            setattr(model, name, replacement)
        else:
            global_batchnorm(child, world)
    return model
