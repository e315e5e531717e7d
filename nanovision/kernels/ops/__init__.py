"""One fused op per file (Liger-Kernel's `ops/` layout): its Triton kernels, their torch.library op or
autograd.Function, the Triton entry points and the plain-torch reference. `nanovision.kernels.dispatch` chooses which
of the two runs."""
