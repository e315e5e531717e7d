"""Fused kernels for nanovision with per-op backend selection.

Backend order per op, chosen once per process:
  1. "triton"        - Triton kernels, when CUDA is available and triton imports
                       (or TRITON_INTERPRET=1 is set, so CPU tests exercise them)
  2. "torch_compile" - torch.compile'd plain-torch reference
  3. "eager"         - plain-torch reference

NANOVISION_KERNEL_BACKEND=triton|torch_compile|eager forces a backend (when usable).
Calls on tensors the chosen backend cannot handle (e.g. CPU tensors with the
Triton backend outside interpreter mode) fall back per call to the next backend.

Note: the functions exported here shadow the same-named submodules as package
attributes (`nanovision.kernels.rms_norm` is the dispatching function); import
the raw Triton entry points with `from nanovision.kernels.rms_norm import rms_norm`.
"""

import logging
import os
import shutil
import warnings
from typing import Dict, Optional

import torch

from . import fused_linear_cross_entropy as _flce_mod
from . import rms_norm as _rms_mod
from . import rope as _rope_mod
from . import swiglu as _swiglu_mod
from . import varlen_attention as _varlen_mod

logger = logging.getLogger("nanovision")

OPS = ("rms_norm", "swiglu", "rope", "linear_ce", "varlen_attention")
BACKENDS = ("triton", "torch_compile", "eager")

_REFERENCES = {
    "rms_norm": _rms_mod.rms_norm_reference,
    "swiglu": _swiglu_mod.swiglu_reference,
    "relu2": _swiglu_mod.relu2_reference,
    "swiglu_linear": _swiglu_mod.swiglu_linear_reference,
    "relu2_linear": _swiglu_mod.relu2_linear_reference,
    "swiglu_linear_packed": _swiglu_mod.swiglu_linear_packed_reference,
    "rope": _rope_mod.apply_rotary_reference,
    "rope_qkv": _rope_mod.apply_rotary_qkv_reference,
    "linear_ce": _flce_mod.linear_cross_entropy_reference,
}
# the activation + down projection ops belong to the "swiglu" op: FusedMLP is what applies either
_OP_OF = {"rms_norm": "rms_norm", "swiglu": "swiglu", "relu2": "swiglu", "swiglu_linear": "swiglu",
          "relu2_linear": "swiglu", "swiglu_linear_packed": "swiglu", "rope": "rope", "rope_qkv": "rope",
          "linear_ce": "linear_ce"}

_BACKENDS: Optional[Dict[str, str]] = None
_FALLBACK: Optional[str] = None
_COMPILED: Dict[str, object] = {}


def _env_true(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "yes", "on")


def _interpret() -> bool:
    return _env_true("TRITON_INTERPRET")


def _triton_usable() -> bool:
    if not all(m.HAS_TRITON for m in (_rms_mod, _swiglu_mod, _rope_mod, _flce_mod, _varlen_mod)):
        return False
    if _interpret():
        return True
    try:
        return torch.cuda.is_available()
    except Exception:  # pragma: no cover
        return False


def _compile_usable() -> bool:
    if not hasattr(torch, "compile") or _env_true("TORCHDYNAMO_DISABLE"):
        return False
    try:
        from torch import _dynamo

        if not _dynamo.is_dynamo_supported():
            return False
    except Exception:  # pragma: no cover
        return False
    if torch.cuda.is_available():
        return True
    # inductor's CPU backend needs a C++ compiler
    return any(shutil.which(c) for c in ("c++", "g++", "clang++"))


def _select() -> Dict[str, str]:
    global _BACKENDS, _FALLBACK
    if _BACKENDS is None:
        compile_ok = _compile_usable()
        _FALLBACK = "torch_compile" if compile_ok else "eager"
        chosen = "triton" if _triton_usable() else _FALLBACK
        forced = os.environ.get("NANOVISION_KERNEL_BACKEND", "").strip().lower()
        if forced:
            if forced not in BACKENDS:
                raise ValueError(f"NANOVISION_KERNEL_BACKEND={forced!r}; expected one of {BACKENDS}")
            usable = {"triton": _triton_usable(), "torch_compile": compile_ok, "eager": True}[forced]
            if usable:
                chosen = forced
                if forced != "triton":
                    _FALLBACK = forced
            else:
                warnings.warn(f"nanovision: forced kernel backend {forced!r} is not usable; using {chosen!r}")
        _BACKENDS = {op: chosen for op in OPS}
    return _BACKENDS


def kernel_backends() -> Dict[str, str]:
    """Backend name per op: {"rms_norm", "swiglu", "rope", "linear_ce", "varlen_attention"} ->
    "triton"|"torch_compile"|"eager"."""
    return dict(_select())


def describe_backends() -> str:
    b = _select()
    return "nanovision kernels: " + " ".join(f"{op}={b[op]}" for op in OPS)


def _reset_backends() -> None:
    """Forget the cached choice (tests / after changing the environment)."""
    global _BACKENDS, _FALLBACK
    _BACKENDS = None
    _FALLBACK = None
    _COMPILED.clear()


def _run_reference(fn_name: str, backend: str, *args, **kwargs):
    ref = _REFERENCES[fn_name]
    if backend == "torch_compile":
        fn = _COMPILED.get(fn_name)
        if fn is None:
            fn = _COMPILED[fn_name] = torch.compile(ref)
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # compilation failure -> eager from now on
            try:
                out = ref(*args, **kwargs)
            except Exception:
                raise e
            op = _OP_OF[fn_name]
            warnings.warn(f"nanovision: torch.compile failed for {fn_name} ({type(e).__name__}); using eager")
            _select()[op] = "eager"
            return out
    return ref(*args, **kwargs)


def _triton(fn):
    """Under TRITON_INTERPRET the kernels run as numpy code, which dynamo cannot trace: keep those calls out of
    compiled graphs (on a GPU, torch.compile traces through the ops and the Triton kernels in them)."""
    return torch.compiler.disable(fn) if _interpret() else fn


def _backend(op: str, t: torch.Tensor) -> str:
    b = _select()[op]
    if b == "triton" and not (t.is_cuda or _interpret()):
        return _FALLBACK
    return b


def rms_norm(x, weight=None, eps: float = 1e-6, residual=None, out_dtype=None):
    """RMSNorm over the last dim; with `residual` returns (norm(x + residual), x + residual); the normalised output
    in `out_dtype` if given."""
    b = _backend("rms_norm", x)
    if b == "triton":
        return _triton(_rms_mod.rms_norm)(x, weight, eps, residual, out_dtype)
    return _run_reference("rms_norm", b, x, weight, eps, residual, out_dtype)


def swiglu(gate, up):
    """silu(gate) * up."""
    b = _backend("swiglu", gate)
    if b == "triton":
        return _triton(_swiglu_mod.swiglu)(gate, up)
    return _run_reference("swiglu", b, gate, up)


def relu2(x):
    """relu(x) ** 2."""
    b = _backend("swiglu", x)
    if b == "triton":
        return _triton(_swiglu_mod.relu2)(x)
    return _run_reference("relu2", b, x)


def swiglu_linear(gate, up, weight, bias=None):
    """F.linear(silu(gate) * up, weight, bias); the Triton backend keeps gate/up but not the activation for backward.
    weight/bias in the activation's dtype (under autocast, cast them first)."""
    b = _backend("swiglu", gate)
    if b == "triton":
        return _triton(_swiglu_mod.swiglu_linear)(gate, up, weight, bias)
    return _run_reference("swiglu_linear", b, gate, up, weight, bias)


def relu2_linear(x, weight, bias=None):
    """F.linear(relu(x) ** 2, weight, bias); like swiglu_linear."""
    b = _backend("swiglu", x)
    if b == "triton":
        return _triton(_swiglu_mod.relu2_linear)(x, weight, bias)
    return _run_reference("relu2_linear", b, x, weight, bias)


def swiglu_linear_packed(gate_up, weight, bias=None):
    """swiglu_linear on gate and up packed as one [..., 2 * I] tensor (gate first), whose gradient is one tensor too."""
    b = _backend("swiglu", gate_up)
    if b == "triton":
        return _triton(_swiglu_mod.swiglu_linear_packed)(gate_up, weight, bias)
    return _run_reference("swiglu_linear_packed", b, gate_up, weight, bias)


def apply_rotary(q, k, cos, sin):
    """HF rotate_half RoPE: q [B, Hq, T, D], k [B, Hk, T, D], cos/sin [B or 1, T, D] -> (q_rot, k_rot)."""
    b = _backend("rope", q)
    if b == "triton":
        return _triton(_rope_mod.apply_rotary)(q, k, cos, sin)
    return _run_reference("rope", b, q, k, cos, sin)


def apply_rotary_qkv(qkv, cos, sin, n_q_heads: int, n_kv_heads: int):
    """RoPE on packed q/k/v projections [B, T, (Hq + 2 Hk) * D] -> (q_rot [B, Hq, T, D], k_rot, v [B, Hk, T, D]); the
    Triton backward writes the packed gradient in one pass."""
    b = _backend("rope", qkv)
    if b == "triton":
        return _triton(_rope_mod.apply_rotary_qkv)(qkv, cos, sin, n_q_heads, n_kv_heads)
    return _run_reference("rope_qkv", b, qkv, cos, sin, n_q_heads, n_kv_heads)


def fused_linear_cross_entropy(
    hidden,
    lm_head_weight,
    labels,
    ignore_index: int = -100,
    reduction: str = "mean",
    softcap=None,
    num_items_in_batch=None,
):
    """Cross-entropy of hidden @ lm_head_weight.T vs labels (already aligned, no shift); fp32 loss."""
    b = _backend("linear_ce", hidden)
    if b == "triton":
        # Always outside compiled graphs: dynamo cannot trace its in-place fp32 accumulation (addmm out=/out_dtype),
        # and as the model's last op it costs one graph break at the end.
        return torch.compiler.disable(_flce_mod.fused_linear_cross_entropy)(
            hidden, lm_head_weight, labels, ignore_index=ignore_index, reduction=reduction,
            softcap=softcap, num_items_in_batch=num_items_in_batch,
        )
    return _run_reference(
        "linear_ce", b, hidden, lm_head_weight, labels, ignore_index=ignore_index, reduction=reduction,
        softcap=softcap, num_items_in_batch=num_items_in_batch,
    )


def varlen_attention(q, k, v, cu_seqlens, max_seqlen: int, scale=None):
    """Causal attention within each document of packed tokens: q [N, Hq, D], k/v [N, Hkv, D], cu_seqlens int32
    [documents + 1] -> [N, Hq, D]. The reference (per-document SDPA) never runs compiled: its loop is data-dependent."""
    if _backend("varlen_attention", q) == "triton":
        return _triton(_varlen_mod.varlen_attention)(q, k, v, cu_seqlens, max_seqlen, scale)
    return _varlen_mod.varlen_attention_reference(q, k, v, cu_seqlens, max_seqlen, scale)


from .layers import (  # noqa: E402
    VARLEN_ATTENTION,
    FusedMLP,
    FusedRMSNorm,
    apply_fused_kernels,
    document_bounds,
    register_varlen_attention,
    varlen_attention_forward,
)

register_varlen_attention()

__all__ = [
    "OPS",
    "kernel_backends",
    "describe_backends",
    "rms_norm",
    "swiglu",
    "relu2",
    "swiglu_linear",
    "relu2_linear",
    "swiglu_linear_packed",
    "apply_rotary",
    "apply_rotary_qkv",
    "fused_linear_cross_entropy",
    "varlen_attention",
    "varlen_attention_forward",
    "document_bounds",
    "VARLEN_ATTENTION",
    "apply_fused_kernels",
    "FusedRMSNorm",
    "FusedMLP",
]
