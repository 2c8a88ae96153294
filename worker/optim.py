"""The optimizer a run steps: AdamW alone, or Muon for the blocks' matrices beside AdamW.

``Optimizers`` is what the trainer holds, whatever ``TrainConfig.optimizer`` says: one object it
sets the learning rate on, steps (through the GradScaler, which unscales and steps each underlying
optimizer), zeroes and saves. Its ``state_dict`` has torch's one-optimizer layout (``state``
keyed by parameter index, ``param_groups`` holding those indices), AdamW's groups first, so the
training state (``worker.state``) stores it as it stores a lone AdamW, and an AdamW run's state is
what it was before Muon existed.

With ``optimizer="muon"`` the 2-D weights inside the transformer blocks (``transformer.h.*``:
the attention and MLP matrices) go to ``torch.optim.Muon`` (``Muon`` below: in fp32 on a CPU);
the embeddings, the output head when untied, norm gains and biases stay with AdamW and its
settings. Both follow the run's schedule:
each group's learning rate is its own peak times ``lr_at(...) / lr``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from contract.train import TrainConfig

# Muon's update is an orthogonalised matrix, scaled per shape as Keller Jordan's reference does
# ("original": × sqrt(max(1, rows/cols))), so muon_lr is in Muon's own units (0.02 is that
# reference's default, modded-nanogpt runs ~0.05 with a similar scaling) and independent of
# AdamW's lr. The alternative, "match_rms_adamw" (Moonshot's 0.2·sqrt(max(rows, cols))), would
# let Muon reuse AdamW's lr, but then a change of lr moves both at once, and AdamW's lr for the
# embeddings is not what the matrices want.
MUON_ADJUST_LR = "original"


class Muon(torch.optim.Muon):
    """torch's Muon, whose Newton–Schulz iteration runs in fp32 on a CPU.

    torch orthogonalises each update in bfloat16, which GPUs multiply fastest; a CPU without
    bfloat16 matrix units emulates it, and there Muon's step took 0.96 s against 0.06 s in fp32
    for the ``small`` preset's 16 matrices (an AMD EPYC, 2 cores), longer than the forward and
    backward passes. On a GPU this is torch's step as it is. Same state (one momentum buffer per
    matrix), same update rule: only the iteration's precision differs."""

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        if not any(p.is_cpu for group in self.param_groups for p in group["params"]):
            return super().step(closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params: list[Tensor] = []
            grads: list[Tensor] = []
            buffers: list[Tensor] = []
            self._init_group(group, params, grads, buffers)
            lr, momentum = group["lr"], group["momentum"]
            for param, grad, buffer in zip(params, grads, buffers, strict=True):
                buffer.lerp_(grad, 1 - momentum)
                update = grad.lerp(buffer, momentum) if group["nesterov"] else buffer
                update = _orthogonalised(
                    update, group["ns_coefficients"], group["ns_steps"], group["eps"]
                )
                param.mul_(1 - lr * group["weight_decay"])
                param.add_(update, alpha=-lr * _lr_scale(group["adjust_lr_fn"], param.shape))
        return loss


def _orthogonalised(
    matrix: Tensor, coefficients: tuple[float, float, float], steps: int, eps: float
) -> Tensor:
    """The quintic Newton–Schulz iteration of torch's (and Keller Jordan's) Muon, in fp32."""
    a, b, c = coefficients
    tall = matrix.size(0) > matrix.size(1)
    x = matrix.float().T if tall else matrix.float()
    x = x / x.norm().clamp(min=eps)  # spectral norm at most 1
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


def _lr_scale(adjust_lr_fn: str | None, shape: torch.Size) -> float:
    """torch's per-shape learning-rate adjustment: "original" (the default) or Moonshot's."""
    rows, columns = shape[:2]
    if adjust_lr_fn == "match_rms_adamw":
        return 0.2 * math.sqrt(max(rows, columns))
    return math.sqrt(max(1.0, rows / columns))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices and embeddings; leave biases and LayerNorm gains alone, as GPT-2 did.
    The tied embedding/head matrix appears once (named_parameters removes duplicates)."""
    return _decay_groups([p for p in model.parameters() if p.requires_grad], weight_decay)


def _decay_groups(params: list[nn.Parameter], weight_decay: float) -> list[dict[str, Any]]:
    return [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]


def muon_split(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(Muon's parameters, AdamW's): the 2-D weights of the transformer blocks, and the rest."""
    muon, adamw = [], []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        inside_blocks = name.startswith("transformer.h.")
        (muon if inside_blocks and parameter.dim() == 2 else adamw).append(parameter)
    return muon, adamw


class Optimizers:
    """One or two torch optimizers, each with its peak learning rate, stepped as one."""

    def __init__(self, optimizers: list[tuple[torch.optim.Optimizer, float]]) -> None:
        self.optimizers = [optimizer for optimizer, _ in optimizers]
        self.peaks = [peak for _, peak in optimizers]

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [group for optimizer in self.optimizers for group in optimizer.param_groups]

    def set_lr(self, scale: float) -> None:
        """Every group at its optimizer's peak learning rate times ``scale``."""
        for optimizer, peak in zip(self.optimizers, self.peaks, strict=True):
            for group in optimizer.param_groups:
                group["lr"] = peak * scale

    def unscale_(self, scaler: torch.amp.GradScaler) -> None:
        for optimizer in self.optimizers:
            scaler.unscale_(optimizer)

    def step(self, scaler: torch.amp.GradScaler) -> None:
        """Each optimizer through ``scaler`` (which skips them all on an inf/NaN gradient);
        the caller then calls ``scaler.update()`` once."""
        for optimizer in self.optimizers:
            scaler.step(optimizer)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        """torch's layout for one optimizer: the parameter indices run on across optimizers."""
        state: dict[int, Any] = {}
        groups: list[dict[str, Any]] = []
        offset = 0
        for optimizer in self.optimizers:
            saved = optimizer.state_dict()
            state.update({offset + index: value for index, value in saved["state"].items()})
            for group in saved["param_groups"]:
                groups.append({**group, "params": [offset + i for i in group["params"]]})
            offset += sum(len(group["params"]) for group in saved["param_groups"])
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        groups = list(saved["param_groups"])
        wanted = sum(len(optimizer.param_groups) for optimizer in self.optimizers)
        if len(groups) != wanted:
            raise ValueError(f"the saved optimizer has {len(groups)} groups, this one {wanted}")
        for optimizer in self.optimizers:
            count = len(optimizer.param_groups)
            mine, groups = groups[:count], groups[count:]
            indices = {index for group in mine for index in group["params"]}
            state = {k: v for k, v in saved["state"].items() if k in indices}
            optimizer.load_state_dict({"state": state, "param_groups": mine})


def build_optimizers(model: nn.Module, config: TrainConfig, device: torch.device) -> Optimizers:
    """AdamW over the whole model, or (``optimizer="muon"``) Muon over the blocks' matrices
    and AdamW over the rest."""
    # One kernel per step over all parameters: on the CPU too (5× faster than foreach).
    fused = device.type in ("cuda", "cpu")
    if config.optimizer == "adamw":
        groups, muon = param_groups(model, config.weight_decay), []
    else:
        muon, rest = muon_split(model)
        groups = _decay_groups(rest, config.weight_decay)
    adamw = torch.optim.AdamW(groups, lr=config.lr, betas=(config.beta1, config.beta2), fused=fused)
    optimizers: list[tuple[torch.optim.Optimizer, float]] = [(adamw, config.lr)]
    if muon:
        optimizer = Muon(
            muon,
            lr=config.muon_lr,
            weight_decay=config.muon_weight_decay,
            momentum=config.muon_momentum,
            nesterov=True,
            adjust_lr_fn=MUON_ADJUST_LR,
        )
        optimizers.append((optimizer, config.muon_lr))
    return Optimizers(optimizers)
