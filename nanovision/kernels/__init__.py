"""nanovision's fused kernels.

  ops/       one op per file: its Triton kernels, their autograd and the plain-torch reference
  dispatch   the op vocabulary (OPS) and the ops' public functions, which run the Triton kernels or the reference
  layers     nn.Module wrappers and `apply_fused_kernels`, which puts the ops into a model
  attention  attn_implementation="nanovision_varlen" (packed documents) for transformers models, registered on import
"""

from .attention import VARLEN_ATTENTION, document_bounds, varlen_attention_forward
from .dispatch import (
    OPS,
    apply_rotary,
    apply_rotary_qkv,
    describe_backends,
    fused_linear_cross_entropy,
    kernel_backends,
    layer_norm,
    relu2,
    relu2_linear,
    reset_backends,
    rms_norm,
    swiglu,
    swiglu_linear,
    swiglu_linear_packed,
    varlen_attention,
)
from .layers import FusedLayerNorm, FusedMLP, FusedRMSNorm, apply_fused_kernels

__all__ = [
    "OPS",
    "kernel_backends",
    "describe_backends",
    "reset_backends",
    "rms_norm",
    "layer_norm",
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
    "FusedLayerNorm",
    "FusedMLP",
]
