"""Which tensors torch.compile takes each nanovision Triton kernel to write, traced with dynamic shapes on this CPU:
prints JSON {case: [[kernel, [written argument names], [names with a size-1 dim of symbolic stride]], ...]} for
tests/test_kernel_dispatch.py.

torch.compile reads a kernel's writes off its Triton IR, tracing each store's pointer back to the kernel's arguments,
and copies every tensor it finds before the launch: a read-only input found there costs a copy a call in every
compiled graph. And torch 2.11's inductor fails to compile that copy under dynamic shapes for a tensor with a size-1
dim of symbolic stride (pytorch/pytorch#181735). The Triton IR needs a GPU target, not a GPU: a stand-in driver
names an sm_90 one. Run without TRITON_INTERPRET (its kernels cannot be traced).
"""

import json

import torch
import triton
from torch._dynamo.backends.common import aot_autograd
from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table, triton_kernel_wrapper_functional
from triton.backends.compiler import GPUTarget

from nanovision.kernels.ops import rms_norm, rope, swiglu, varlen_attention


class TargetOnlyDriver:
    """What tracing asks of Triton's driver: the target to build the IR for."""

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_current_device(self):
        return 0


def leaf(*shape):
    return torch.randn(*shape, requires_grad=True)


B, T, D = 1, 7, 16  # a batch of one row: its size-1 dim has a symbolic stride under dynamic shapes
CASES = {
    "rms_norm": (lambda x, w: rms_norm.rms_norm(x, w).sum(), lambda: (leaf(B, T, 64), leaf(64))),
    "rms_norm with residual": (lambda x, w, r: sum(t.sum() for t in rms_norm.rms_norm(x, w, 1e-6, r)),
                               lambda: (leaf(B, T, 64), leaf(64), leaf(B, T, 64))),
    "layer_norm with residual": (
        lambda x, w, b, r: sum(t.sum() for t in rms_norm.layer_norm(x, w, b, 1e-5, r)),
        lambda: (leaf(B, T, 64), leaf(64), leaf(64), leaf(B, T, 64))),
    "swiglu": (lambda g, u: swiglu.swiglu(g, u).sum(), lambda: (leaf(B, T, 64), leaf(B, T, 64))),
    "relu2": (lambda x: swiglu.relu2(x).sum(), lambda: (leaf(B, T, 64),)),
    "swiglu_linear_packed": (lambda gu, w: swiglu.swiglu_linear_packed(gu, w).sum(),
                             lambda: (leaf(B, T, 128), leaf(32, 64))),
    "rope": (lambda q, k, c, s: sum(t.sum() for t in rope.apply_rotary(q, k, c, s)),
             lambda: (leaf(B, T, 4, D).transpose(1, 2), leaf(B, T, 2, D).transpose(1, 2), torch.randn(1, T, D),
                      torch.randn(1, T, D))),
    "rope_qkv": (lambda qkv, c, s: sum(t.sum() for t in rope.apply_rotary_qkv(qkv, c, s, 4, 2)),
                 lambda: (leaf(B, T, 8 * D), torch.randn(1, T, D), torch.randn(1, T, D))),
    "varlen_attention": (lambda q, k, v, cu: varlen_attention.varlen_attention(q, k, v, cu, 4).sum(),
                         lambda: (leaf(B * T, 2, D), leaf(B * T, 1, D), leaf(B * T, 1, D),
                                  torch.tensor([0, 3, B * T], dtype=torch.int32))),
}


def main():
    triton.runtime.driver.set_active(TargetOnlyDriver())
    writes = []

    def record(gm, example_inputs):
        for node in gm.graph.nodes:
            if node.target is triton_kernel_wrapper_functional:
                kernel = kernel_side_table.get_kernel(node.kwargs["kernel_idx"]).fn.__name__
                names = sorted(node.kwargs["tensors_to_clone"])
                vals = {name: node.kwargs["kwargs"][name].meta["val"] for name in names}
                size_one = [name for name, val in vals.items()
                            if any(size == 1 and not isinstance(stride, int)
                                   for size, stride in zip(val.shape, val.stride()))]
                writes.append([kernel, names, size_one])
        return gm

    backend = aot_autograd(fw_compiler=record, bw_compiler=record)
    result = {}
    for name, (fn, inputs) in CASES.items():
        torch._dynamo.reset()
        writes.clear()
        # record() runs the graphs as traced; the launch that follows needs a GPU, and is not the point
        try:
            torch.compile(fn, backend=backend, dynamic=True, fullgraph=True)(*inputs()).backward()
        except Exception as error:  # noqa: BLE001
            if not writes:
                raise RuntimeError(f"{name}: nothing traced") from error
        result[name] = list(writes)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
