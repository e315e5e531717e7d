"""torch.library.wrap_triton on every torch the kernels run on."""

from torch.library import wrap_triton as _torch_wrap_triton
from triton.runtime.interpreter import InterpretedFunction


def wrap_triton(kernel):
    """torch.library.wrap_triton; torch before 2.12 refuses the interpreter's kernels (TRITON_INTERPRET=1), which
    only run in eager calls (kept out of compiled graphs) and need no wrapping there."""
    return kernel if isinstance(kernel, InterpretedFunction) else _torch_wrap_triton(kernel)
