"""The fused ops' public functions, and which implementation runs each op.

Backend order, chosen once per process, at import (inside a compiled region the choice would cost graph breaks:
dynamo cannot trace its probes, and a graph compiled around them keeps the breaks after the choice is cached):
  1. "triton"        - the Triton kernels of `ops/`, when triton imports and CUDA is available (or TRITON_INTERPRET=1
                       is set, so that CPU tests run them on the interpreter)
  2. "torch_compile" - the torch.compile'd plain-torch reference
  3. "eager"         - the plain-torch reference

NANOVISION_KERNEL_BACKEND=triton|torch_compile|eager forces a backend (when usable). A call on tensors the chosen
backend cannot take (CPU tensors with the Triton backend outside the interpreter) runs the fallback backend.
"""

import functools
import inspect
import os
import shutil
import warnings
from typing import Callable, Dict, Optional

import torch

from ..configuration_nanovision import FUSED_KERNEL_OPS
from .ops import linear_cross_entropy as linear_cross_entropy_ops
from .ops import rms_norm as rms_norm_ops
from .ops import rope as rope_ops
from .ops import swiglu as swiglu_ops
from .ops import varlen_attention as varlen_attention_ops

# The op vocabulary: the ops `apply_fused_kernels` puts into a model (the config's `use_fused_kernels` names), and the
# packed attention behind attn_implementation="nanovision_varlen"; kernel_backends() reports one backend for each.
OPS = FUSED_KERNEL_OPS + ("varlen_attention",)
BACKENDS = ("triton", "torch_compile", "eager")
_OP_MODULES = (rms_norm_ops, swiglu_ops, rope_ops, linear_cross_entropy_ops, varlen_attention_ops)

_BACKENDS: Optional[Dict[str, str]] = None
_FALLBACK: Optional[str] = None
_COMPILED: Dict[str, Callable] = {}


def _env_true(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "yes", "on")


def _interpret() -> bool:
    return _env_true("TRITON_INTERPRET")


def _triton_usable() -> bool:
    if not all(module.HAS_TRITON for module in _OP_MODULES):
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
    """Backend name per op of OPS: "triton", "torch_compile" or "eager"."""
    return dict(_select())


def describe_backends() -> str:
    backends = _select()
    return "nanovision kernels: " + " ".join(f"{op}={backends[op]}" for op in OPS)


def reset_backends() -> None:
    """Choose again (tests, or after changing the environment)."""
    global _BACKENDS, _FALLBACK
    _BACKENDS = None
    _FALLBACK = None
    _COMPILED.clear()
    _select()


def _run_compiled(name: str, op: str, reference: Callable, *args, **kwargs):
    fn = _COMPILED.get(name)
    if fn is None:
        fn = _COMPILED[name] = torch.compile(reference)
    try:
        return fn(*args, **kwargs)
    except Exception as e:  # compilation failure -> eager from now on
        try:
            out = reference(*args, **kwargs)
        except Exception:
            raise e
        warnings.warn(f"nanovision: torch.compile failed for {name} ({type(e).__name__}); using eager")
        _select()[op] = "eager"
        return out


def _dispatch(op: str, triton_fn: Callable, reference: Callable, *, compile_reference: bool = True,
              graph_break: bool = False) -> Callable:
    """The public function of one Triton entry point of `op`: it runs `triton_fn` or `reference` (same arguments) by
    the op's backend and the device of the first argument.

    compile_reference: the torch_compile backend compiles the reference (else it runs eagerly).
    graph_break: the Triton path always runs outside compiled graphs. Every Triton path does under TRITON_INTERPRET,
    where the kernels run as numpy code that dynamo cannot trace (on a GPU, torch.compile traces through the ops and
    the Triton kernels in them)."""
    name = triton_fn.__name__
    first = next(iter(inspect.signature(reference).parameters))

    def call(*args, **kwargs):
        tensor = args[0] if args else kwargs[first]
        backend = _select()[op]
        if backend == "triton" and not (tensor.is_cuda or _interpret()):
            backend = _FALLBACK
        if backend == "triton":
            fn = torch.compiler.disable(triton_fn) if graph_break or _interpret() else triton_fn
            return fn(*args, **kwargs)
        if backend == "torch_compile" and compile_reference:
            return _run_compiled(name, op, reference, *args, **kwargs)
        return reference(*args, **kwargs)

    functools.update_wrapper(call, triton_fn)
    call.__module__ = __name__  # pickled by name as this dispatching function, not as the Triton entry point
    call.__doc__ = (f"{triton_fn.__doc__.rstrip()}\n\n    Runs on the {op!r} op's backend; the reference is "
                    f"`{reference.__module__}.{reference.__name__}`.")
    return call


# The activation + down projection functions belong to the "swiglu" op: FusedMLP is what applies either activation.
rms_norm = _dispatch("rms_norm", rms_norm_ops.rms_norm, rms_norm_ops.rms_norm_reference)
layer_norm = _dispatch("layer_norm", rms_norm_ops.layer_norm, rms_norm_ops.layer_norm_reference)
swiglu = _dispatch("swiglu", swiglu_ops.swiglu, swiglu_ops.swiglu_reference)
relu2 = _dispatch("swiglu", swiglu_ops.relu2, swiglu_ops.relu2_reference)
swiglu_linear = _dispatch("swiglu", swiglu_ops.swiglu_linear, swiglu_ops.swiglu_linear_reference)
relu2_linear = _dispatch("swiglu", swiglu_ops.relu2_linear, swiglu_ops.relu2_linear_reference)
swiglu_linear_packed = _dispatch("swiglu", swiglu_ops.swiglu_linear_packed, swiglu_ops.swiglu_linear_packed_reference)
apply_rotary = _dispatch("rope", rope_ops.apply_rotary, rope_ops.apply_rotary_reference)
apply_rotary_qkv = _dispatch("rope", rope_ops.apply_rotary_qkv, rope_ops.apply_rotary_qkv_reference)
# dynamo cannot trace its in-place fp32 accumulation (addmm out=/out_dtype); as the model's last op it costs one graph
# break at the end
fused_linear_cross_entropy = _dispatch("linear_cross_entropy", linear_cross_entropy_ops.fused_linear_cross_entropy,
                                       linear_cross_entropy_ops.linear_cross_entropy_reference, graph_break=True)
# the reference's loop over length classes is data-dependent: never compiled
varlen_attention = _dispatch("varlen_attention", varlen_attention_ops.varlen_attention,
                             varlen_attention_ops.varlen_attention_reference, compile_reference=False)

_select()
