"""Training and fine-tuning of RWKV-4 / Eagle / Finch: RWKV-LM's recipe on PyTorch's own engines.

- ``config``: ``TrainConfig`` from YAML + ``key=value`` overrides.
- ``init``: RWKV-LM's initialisation; ``optim``: parameter groups, schedule, L2Wrap.
- ``data``: magic-prime random crops of a token stream (resumable, process-count independent).
- ``lora`` / ``state_tune``: the two light fine-tuning modes; ``distributed``: torchrun, DDP, FSDP2.
- ``trainer``: the loop; ``metrics``: JSONL log and loss curve; ``cli``: ``rwkvkit train``.
- ``vocab``: small vocabularies cut from the World vocabulary (the demo model's data).

Nothing is imported here; use ``from rwkvkit.train.trainer import Trainer``.
"""
