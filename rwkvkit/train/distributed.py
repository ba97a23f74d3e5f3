"""Multi-process training through PyTorch's own engines: torchrun + DDP or FSDP2, DeepSpeed optional.

``setup(strategy, device)`` reads the process layout that ``torchrun`` publishes (RANK, WORLD_SIZE,
LOCAL_RANK: torchrun's protocol, not configuration) and initialises the process group: gloo on CPU,
nccl on CUDA. ``wrap(model, ctx)`` applies the strategy:

- ``single``: the model as is.
- ``ddp``: ``DistributedDataParallel`` (gradients averaged over processes after backward).
- ``fsdp``: FSDP2, ``torch.distributed.fsdp.fully_shard`` on every block (block 0: its time-mix and
  channel-mix, since the LM applies its ``ln0`` itself) and then on the root, over a 1-D device
  mesh; parameters become sharded DTensors, so the optimiser is built after wrapping.
- ``deepspeed``: only when the ``deepspeed`` package is importable (``pip install deepspeed``); ZeRO
  stage 2 through ``deepspeed.initialize`` (see ``deepspeed_engine``).

Every process computes the same samples it would in a single process with the same global batch
(see ``data.global_index``), so loss curves match across process counts.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class DistContext:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    strategy: str = "single"
    initialized: bool = False  # True when this module created the process group

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _pick_device(device: str, local_rank: int) -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        device = f"cuda:{local_rank}"
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} requested but CUDA is not available in this PyTorch build")
    return dev


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup(strategy: str = "auto", device: str = "auto") -> DistContext:
    """Initialise the process group when launched by torchrun with several processes, or for ddp/fsdp
    with any number of processes (a group of one is made when there is no torchrun)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = _pick_device(device, local_rank)
    if strategy == "auto":
        strategy = "ddp" if world > 1 else "single"
    if strategy == "single" and world > 1:
        raise ValueError(
            "strategy 'single' cannot run under torchrun with several processes; use ddp or fsdp"
        )
    if strategy == "deepspeed":
        try:
            import deepspeed  # noqa: F401
        except ImportError as e:
            raise RuntimeError(
                "strategy 'deepspeed' needs the DeepSpeed package (pip install deepspeed); "
                "PyTorch's own DDP and FSDP2 need nothing extra: strategy=ddp or strategy=fsdp"
            ) from e
    initialized = False
    if world == 1 and strategy in ("ddp", "fsdp") and "MASTER_ADDR" not in os.environ:
        # one process outside torchrun: a group of one on this machine (DDP needs a group even then)
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0", WORLD_SIZE="1")
    if (world > 1 or strategy in ("ddp", "fsdp")) and not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(
            backend="nccl" if dev.type == "cuda" else "gloo", device_id=dev if dev.type == "cuda" else None
        )
        initialized = True
    return DistContext(rank, world, local_rank, dev, strategy, initialized)


def wrap(model: nn.Module, ctx: DistContext) -> nn.Module:
    """The model wrapped for the context's strategy (DeepSpeed wraps later, with its optimiser)."""
    if ctx.strategy in ("single", "deepspeed"):
        return model
    if ctx.strategy == "ddp":
        if not any(p.requires_grad for p in model.parameters()):
            return model  # state tuning: a frozen model; the trainer averages the state's gradient
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        return DDP(model, device_ids=ids)
    if ctx.strategy == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(ctx.device.type, (ctx.world,))
        # The LM applies blocks[0].ln0 from its own forward, before block 0 runs: block 0's
        # LayerNorms stay in the root group, its time-mix and channel-mix are sharded units.
        first = model.blocks[0]
        fully_shard(first.att, mesh=mesh)
        fully_shard(first.ffn, mesh=mesh)
        for block in model.blocks[1:]:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model
    raise ValueError(f"unknown strategy {ctx.strategy!r}")


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module under a DDP / DeepSpeed wrapper (FSDP2 shards in place: the module itself)."""
    return getattr(model, "module", model)


def no_sync(model: nn.Module, skip: bool):
    """DDP: skip the gradient all-reduce of this backward (accumulation); a no-op otherwise."""
    if skip and hasattr(model, "no_sync"):
        return model.no_sync()
    return contextlib.nullcontext()


def all_mean(x: float, ctx: DistContext) -> float:
    """The mean of a scalar over processes (itself when single)."""
    if ctx.world == 1 or not dist.is_initialized():
        return x
    t = torch.tensor([x], dtype=torch.float64, device=ctx.device if ctx.device.type == "cuda" else "cpu")
    dist.all_reduce(t)
    return float(t.item()) / ctx.world


def broadcast_flag(flag: bool, ctx: DistContext) -> bool:
    """Rank 0's decision, on every process (so all stop at the same step)."""
    if ctx.world == 1 or not dist.is_initialized():
        return flag
    t = torch.tensor([1 if flag else 0], device=ctx.device if ctx.device.type == "cuda" else "cpu")
    dist.broadcast(t, 0)
    return bool(t.item())


def average_grads(params: list[torch.Tensor], ctx: DistContext) -> None:
    """All-reduce-mean the gradients of parameters that no wrapper synchronises (the tuned state)."""
    if ctx.world == 1 or not dist.is_initialized():
        return
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= ctx.world


def barrier(ctx: DistContext) -> None:
    if ctx.world > 1 and dist.is_initialized():
        dist.barrier()


def teardown(ctx: DistContext) -> None:
    if ctx.initialized and dist.is_initialized():
        dist.destroy_process_group()


def deepspeed_engine(
    model: nn.Module, optimizer: torch.optim.Optimizer, grad_clip: float, micro_bsz: int, accum: int
):
    """``deepspeed.initialize`` with ZeRO-2, bf16 on CUDA; returns the engine (engine.backward / engine.step)."""
    import deepspeed

    config = {
        "train_micro_batch_size_per_gpu": micro_bsz,
        "gradient_accumulation_steps": accum,
        "gradient_clipping": grad_clip,
        "zero_optimization": {"stage": 2},
        "bf16": {"enabled": torch.cuda.is_available()},
    }
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    return engine
