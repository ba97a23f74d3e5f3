"""The one-call decode step: one token per row, on the CPU, for the versions that declare one.

``RWKV.forward`` hands a T == 1 call here when it can (CPU, no gradient wanted, a version with a
native step, fp32, bf16, fp16 or int8 matrices, backend "auto" or "native"): the native step
(``rwkvkit/ops/_decode_cpu.c``) then runs every layer and the head in one C call, reading the weights
where the model keeps them. This module builds the plan (a flat int64 array of addresses and sizes,
the layout of the C structs: the generic header here, each layer's record by the version's
``native_layer``) and checks, at every call, that the model still holds the tensors the plan points
to; anything it cannot take (a version without a native step, tensors on another device) stays on
the PyTorch path. fp16 models' layer rescaling (x halved after every ``rescale_every``-th block) is
part of the plan; their activations are float32 in the step, as every model's.

Whether the step is wanted is the model's choice (``Kernels.native_step``, ``rwkvkit.kernels``); with
it off the PyTorch modules run, which is how the tests compare the two.

Numerics by batch size: one row always multiplies float32 activations (so a bf16 file decodes as the
reference's fp32 strategy). A step of ``BATCH_BF16_ROWS`` rows or more, with ``Kernels.batch_bf16``
(the default), rounds the inputs of its bf16 and int8 matrices to bf16 (int8 weights dequantised to
bf16, as a prompt's): B rows cost B x 2 FLOPs per weight, and bf16 products (VDPBF16PS) take half the
instructions of fp32 FMAs and no widening of the weights. Each row's result is the same whatever the
other rows of the batch are (the kernels compute every output the same way), but it differs from
that row decoded alone by the bf16 rounding of the activations (``rwkvkit bench forward --only-batched``
prints how much).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .. import kernels
from ..config import ModelConfig
from ..ops import decode as native
from ..state import State
from .quant import Int8Linear

_HEADER_INTS, _LAYER_INTS = native._decode_cpu.layout() if native.available() else (0, 0)
BATCH_BF16_ROWS = 2  # steps of at least this many rows take bf16 activations (Kernels.batch_bf16)

# Setting a module, parameter or buffer on any module (``module.x = ...``, ``blocks[i] = ...``) goes
# through torch's global registration hooks; this count of them lets ``PlannedStep.valid`` skip its
# walk over the ~600 (module dict, name) pairs of a plan while none happened. That walk ran on cold
# caches after each step (the step streams the weights through them): ~0.25 ms of a 7 ms int8 step.
_registrations = 0


def _registered(*_args: object) -> None:
    global _registrations
    _registrations += 1


for _hook in (
    torch.nn.modules.module.register_module_parameter_registration_hook,
    torch.nn.modules.module.register_module_buffer_registration_hook,
    torch.nn.modules.module.register_module_module_registration_hook,
):
    _hook(_registered)


class Unsupported(Exception):
    """The model (as it is now) cannot run through the native step; the message says why."""


def enabled() -> bool:
    """Built and chosen (``kernels.active().native_step``)."""
    return native.available() and kernels.active().native_step


class PlanBuilder:
    def __init__(self) -> None:
        self.ints: list[int] = []
        self.tensors: list[torch.Tensor] = []  # everything the plan points to (kept alive, re-checked)
        self.owners: list[tuple[dict, str, object]] = []  # (module dict, key, object) that must still hold

    def own(self, module: nn.Module, name: str) -> torch.Tensor:
        """``module.name`` (a parameter, buffer or submodule), remembered so a swap invalidates the plan."""
        for d in (module._parameters, module._buffers, module._modules):
            if name in d:
                self.owners.append((d, name, d[name]))
                return d[name]
        raise Unsupported(f"{type(module).__name__} has no {name!r}")

    def ptr(self, t: torch.Tensor, dtype: torch.dtype = torch.float32, numel: int | None = None) -> None:
        if t.device.type != "cpu" or t.dtype != dtype or not t.is_contiguous():
            raise Unsupported(
                f"a {t.dtype} {tuple(t.shape)} tensor on {t.device} (need contiguous {dtype} on cpu)"
            )
        if numel is not None and t.numel() != numel:
            raise Unsupported(f"tensor of {t.numel()} elements where {numel} were expected")
        self.tensors.append(t)
        self.ints.append(t.data_ptr())

    def vec(self, module: nn.Module, name: str, numel: int) -> None:
        """A float32 vector parameter (LayerNorm weights, mixes, decays)."""
        self.ptr(self.own(module, name), numel=numel)

    def matrix(self, parent: nn.Module, name: str) -> None:
        """A (kind, n_out, n_in, data, scales) record for a Linear or Int8Linear ``parent.name``."""
        layer = self.own(parent, name)
        if isinstance(layer, Int8Linear):
            self.ints += [native.MK_Q8, layer.out_features, layer.in_features]
            self.ptr(self.own(layer, "weight_int8"), torch.int8)
            self.ptr(self.own(layer, "scale"), torch.float16)
            return
        w = self.own(layer, "weight")
        kind = native.matrix_kind(w)
        if kind is None:
            raise Unsupported(
                f"a {w.dtype} matrix on {w.device} (the native step takes fp32, bf16, fp16 or int8)"
            )
        self.ints += [kind, w.shape[0], w.shape[1]]
        self.ptr(w, w.dtype)
        self.ints.append(0)

    def lora(self, module: nn.Module | None, name: str, n_out: int, n_in: int, stacked: int = 1) -> None:
        """An input-major matrix [n_in, n_out] (LoRAs; ``stacked`` of them in one tensor, the C side
        taking slice j), or an empty record."""
        if module is None:
            self.ints += [native.MK_F32, 0, 0, 0, 0]
            return
        w = self.own(module, name)
        kind = native.matrix_kind(w)
        if kind is None:
            raise Unsupported(f"a {w.dtype} LoRA on {w.device}")
        self.ints += [kind, n_out, n_in]
        self.ptr(w, w.dtype, stacked * n_out * n_in)
        self.ints.append(0)


class PlannedStep:
    """What a native step keeps of its ``PlanBuilder``: the plan, the tensors it points to, and the
    modules that own them, so that ``valid()`` can tell when the model changed under it."""

    def _keep(self, config: ModelConfig, b: PlanBuilder) -> None:
        self.config = config
        self.plan = torch.tensor(b.ints, dtype=torch.int64)
        self.tensors = b.tensors
        self.pointers = [t.data_ptr() for t in b.tensors]
        self.owners = b.owners
        self.registrations = _registrations

    def _run(self, fn: Callable[..., None], x: torch.Tensor, state: State, recurrent: str, **extra: int
             ) -> tuple[torch.Tensor, State]:  # fmt: skip
        """One C step ``fn`` for every row: float32 contiguous inputs, fresh outputs (``state`` is not
        modified), logits [B, V] float32; several rows take bf16 activations when ``Kernels.batch_bf16``."""
        B = x.shape[0]
        st = state.tensors
        f32 = torch.float32
        ins = {k: st[k].to(f32).contiguous() for k in ("att_shift", "ffn_shift", recurrent)}
        outs = {k: torch.empty_like(v) for k, v in ins.items()}
        x = x.to(f32).contiguous()
        logits = torch.empty((B, self.config.vocab_size), dtype=f32)
        fn(
            plan=self.plan.data_ptr(), B=B, x=x.data_ptr(),
            att_in=ins["att_shift"].data_ptr(), att_out=outs["att_shift"].data_ptr(),
            ffn_in=ins["ffn_shift"].data_ptr(), ffn_out=outs["ffn_shift"].data_ptr(),
            wkv_in=ins[recurrent].data_ptr(), wkv_out=outs[recurrent].data_ptr(),
            logits=logits.data_ptr(), threads=torch.get_num_threads(),
            act_bf16=int(B >= BATCH_BF16_ROWS and kernels.active().batch_bf16), **extra,
        )  # fmt: skip
        for k in ("att_shift", "ffn_shift"):
            outs[k] = outs[k].to(st[k].dtype)
        return logits, State(self.config.version, outs)

    def valid(self) -> bool:
        """Whether the model still holds every module and tensor the plan points to, at the same address
        (a swapped module, a replaced parameter or ``param.data = ...`` all invalidate it). The modules
        are looked up again only after something was set on some module (``_registrations``); changes
        made behind ``nn.Module``'s back (``module._parameters[name] = p``, ``del module.name``) need
        ``model.to()`` or a new ``load`` to be seen."""
        if self.registrations != _registrations:
            if not all(d.get(k) is o for d, k, o in self.owners):
                return False
            self.registrations = _registrations
        return all(t.data_ptr() == p for t, p in zip(self.tensors, self.pointers))


class NativeStep(PlannedStep):
    """A plan for one model; ``step(x, state)`` runs a token for every row. ``RWKV.native_step()`` builds
    and caches it."""

    def __init__(self, model: nn.Module) -> None:
        cfg = model.config
        spec = cfg.spec
        try:
            extra = spec.native_header(cfg)
        except NotImplementedError as e:
            raise Unsupported(str(e)) from None
        if len(spec.recurrent) != 1:
            raise AssertionError("the native step carries one recurrent tensor per layer")
        self.recurrent = spec.recurrent[0].name
        C, H, N = cfg.n_embd, cfg.n_head, cfg.head_size
        b = PlanBuilder()
        b.ints += [cfg.version, cfg.n_layer, C, H, N, cfg.ffn_dim, cfg.vocab_size, *extra]
        b.ints.append(getattr(model, "rescale_every", 0))  # fp16: x halved after every n-th block
        b.vec(b.own(model, "ln_out"), "weight", C)
        b.vec(model.ln_out, "bias", C)
        b.matrix(model, "head")
        if len(b.ints) != _HEADER_INTS:
            raise AssertionError("plan header layout")
        blocks = b.own(model, "blocks")
        for i in range(cfg.n_layer):
            blk = b.own(blocks, str(i))
            start = len(b.ints)
            spec.native_layer(b, blk)
            if len(b.ints) - start != _LAYER_INTS:
                raise AssertionError("plan layer layout")
        self._keep(cfg, b)

    def step(self, x: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """x [B, C] float32 embeddings (consumed: the residual is updated in place) -> (logits [B, V], new state)."""
        return self._run(native._decode_cpu.step, x, state, self.recurrent)
