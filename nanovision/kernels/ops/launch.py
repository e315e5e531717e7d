"""What the kernel files share: torch.library.wrap_triton on every torch they run on, buffers for unused pointer
arguments, 1-D buffers for the tensors a kernel writes, and inputs with a unit stride along the last dim."""

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


def written_buffer(numel, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A 1-D buffer for a kernel to write (the pointer argument), seen by callers through a view of its final shape
    (whose strides the kernel takes). torch.compile (torch 2.11) copies each tensor a Triton kernel writes, and under
    dynamic shapes that copy fails to compile for a tensor with a size-1 dim of symbolic stride
    (pytorch/pytorch#181735), e.g. [1, T, F] for a batch of one row: a 1-D tensor has none."""
    return torch.empty((numel,), dtype=dtype, device=device)


def with_unit_last_stride(t: torch.Tensor) -> torch.Tensor:
    """`t`, or a contiguous copy where its last dim is strided: the kernels index with strides but assume a unit
    stride along the last dim (head dims, rotary angles)."""
    return t if t.stride(-1) == 1 else t.contiguous()
