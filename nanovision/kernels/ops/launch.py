"""What the kernel files share: torch.library.wrap_triton on every torch they run on, buffers for unused pointer
arguments, and inputs with a unit stride along the last dim."""

import torch
from torch.library import wrap_triton as _torch_wrap_triton
from triton.runtime.interpreter import InterpretedFunction


def wrap_triton(kernel):
    """torch.library.wrap_triton; torch before 2.12 refuses the interpreter's kernels (TRITON_INTERPRET=1), which
    only run in eager calls (kept out of compiled graphs) and need no wrapping there."""
    return kernel if isinstance(kernel, InterpretedFunction) else _torch_wrap_triton(kernel)


def unused_pointer(t: torch.Tensor) -> torch.Tensor:
    """A buffer for a pointer argument the kernel leaves alone (its flag is off). Not `t` itself: torch.compile copies
    a tensor once for every argument of a Triton kernel that aliases it."""
    return t.new_empty(1)


def with_unit_last_stride(t: torch.Tensor) -> torch.Tensor:
    """`t`, or a contiguous copy where its last dim is strided: the kernels index with strides but assume a unit
    stride along the last dim (head dims, rotary angles)."""
    return t if t.stride(-1) == 1 else t.contiguous()
