"""Muon for the language model's hidden matrices, AdamW for the rest, as one optimizer for the HF Trainer."""

import math

import torch

# The quintic Newton-Schulz coefficients and norm floor of torch.optim.Muon (Keller Jordan's).
NEWTON_SCHULZ_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NORM_EPS = 1e-7


def orthogonalize(update: torch.Tensor, steps: int = 5, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """About U V^T of update = U S V^T (singular values land in ~[0.5, 1.5]), by Newton-Schulz iterations run in
    `dtype`: the same operations as torch.optim.Muon, which runs them in bf16 only."""
    a, b, c = NEWTON_SCHULZ_COEFFICIENTS
    x = update.to(dtype)
    tall = x.size(0) > x.size(1)
    if tall:  # iterate on the smaller Gram matrix
        x = x.T
    x = x / x.norm().clamp(min=NORM_EPS)  # not in place: .to() may return `update` itself
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


class Muon(torch.optim.Optimizer):
    """torch.optim.Muon's update with its defaults (Nesterov momentum 0.95, 5 Newton-Schulz steps, lr scaled by
    sqrt(max(1, rows / cols))), bit for bit in bf16, plus the choice of the Newton-Schulz dtype: torch's is bf16 only,
    which a CPU without AVX512-BF16/AMX runs several times slower than fp32 (step times: benchmarks/RESULTS.md)."""

    def __init__(self, params, lr: float = 0.02, weight_decay: float = 0.0, momentum: float = 0.95,
                 newton_schulz_dtype: torch.dtype = torch.bfloat16):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum))
        if any(p.ndim != 2 for group in self.param_groups for p in group["params"]):
            raise ValueError("Muon orthogonalises 2D weight matrices only; give vectors (norms, biases) and other "
                             "shapes to AdamW.")
        self.newton_schulz_dtype = newton_schulz_dtype

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, momentum = group["lr"], group["momentum"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                buffer = self.state[param].setdefault("momentum_buffer", torch.zeros_like(param.grad))
                buffer.lerp_(param.grad, 1 - momentum)
                update = orthogonalize(param.grad.lerp(buffer, momentum), dtype=self.newton_schulz_dtype)
                param.mul_(1 - lr * group["weight_decay"])
                param.add_(update, alpha=-lr * math.sqrt(max(1, param.size(0) / param.size(1))))
        return loss


class MuonWithAdamW(torch.optim.Optimizer):
    """Muon for the hidden matrices plus an AdamW for everything else, as one optimizer: the Trainer drives exactly
    one (learning-rate schedule, zero_grad, checkpoints). The param groups are the two optimizers' own dicts, so the
    schedule's learning rates reach both."""

    def __init__(self, muon: Muon, adamw: torch.optim.Optimizer):
        self.muon, self.adamw = muon, adamw
        super().__init__(muon.param_groups + adamw.param_groups, defaults={})

    def step(self, closure=None):
        loss = self.muon.step(closure)  # evaluates the closure, if any, once
        self.adamw.step()
        return loss

    def state_dict(self):
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict()}

    def load_state_dict(self, state_dict):
        missing = {"muon", "adamw"} - set(state_dict)
        if missing:
            raise ValueError(f"This optimizer state has no {sorted(missing)} part: it was saved by another --optim; "
                             "resume with the --optim the checkpoint was trained with.")
        self.muon.load_state_dict(state_dict["muon"])
        self.adamw.load_state_dict(state_dict["adamw"])
        self.param_groups = self.muon.param_groups + self.adamw.param_groups  # loading made new group dicts
