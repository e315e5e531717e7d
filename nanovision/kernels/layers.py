"""nn.Module wrappers around the fused ops and `apply_fused_kernels`.

`apply_fused_kernels(model, ops=None)` patches one model instance in place, for each op of FUSED_KERNEL_OPS:
  rms_norm             NanoVisionRMSNorm        -> FusedRMSNorm (same weight Parameter)
  swiglu               NanoVisionTextMLP        -> FusedMLP (same Linear submodules; swiglu or relu2;
                                                   gate/up as one GEMM)
  rope                 NanoVisionTextAttention  -> instance attributes rotary_fn = apply_rotary,
                                                   qkv_fn = fused_qkv (q/k/v as one GEMM) and
                                                   qkv_rotary_fn = fused_qkv_rotary (that GEMM and the
                                                   rotary as one step, where there is no QK-norm)
  linear_cross_entropy NanoVisionForCausalLM /
                       NanoVisionForConditionalGeneration -> linear_cross_entropy = fused_linear_cross_entropy
  layer_norm           nn.LayerNorm (over the last dim)  -> FusedLayerNorm (same weight / bias Parameters);
                       SiglipEncoderLayer               -> FusedSiglipEncoderLayer (a subclass, set in place: its second
                                                           residual add runs inside layer_norm2), and its
                                                           SiglipAttention -> FusedSiglipAttention (q/k/v as one GEMM)
nanovision's modules are matched by class name so remote-code copies of the classes work too.
Parameter names / state_dict keys are unchanged.
"""

import logging
from typing import Iterable, Optional

import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.siglip.modeling_siglip import SiglipAttention, SiglipEncoderLayer, eager_attention_forward

from ..configuration_nanovision import FUSED_KERNEL_OPS
from . import dispatch
from .ops.rms_norm import layer_norm_reference

logger = logging.getLogger("nanovision")

RMSNORM_CLASS_NAMES = frozenset({"NanoVisionRMSNorm"})
MLP_CLASS_NAMES = frozenset({"NanoVisionTextMLP"})
ATTENTION_CLASS_NAMES = frozenset({"NanoVisionTextAttention"})
LM_CLASS_NAMES = frozenset({"NanoVisionForCausalLM", "NanoVisionForConditionalGeneration"})
# The decoder layer's norms whose outputs only feed projections (q/k/v, gate/up); the SigLIP encoder layer's (q/k/v,
# fc1)
PROJECTION_INPUT_NORMS = frozenset({"input_layernorm", "post_attention_layernorm"})
SIGLIP_PROJECTION_INPUT_NORMS = frozenset({"layer_norm1", "layer_norm2"})

_PLAIN_TYPES = (bool, int, float, str, type(None), tuple)
_SKIP_ATTRS = frozenset({"forward", "training"})
_LOGGED = False


def _adopt(src: nn.Module, dst: nn.Module) -> None:
    """Carry over children, buffers and plain public attributes that `dst` does not define."""
    dst.train(src.training)
    for name, child in src.named_children():
        if name not in dst._modules:
            dst.add_module(name, child)
    for name, buf in src.named_buffers(recurse=False):
        if name not in dst._buffers:
            dst.register_buffer(name, buf, persistent=name not in src._non_persistent_buffers_set)
    for name, value in vars(src).items():
        if name.startswith("_") or name in _SKIP_ATTRS or not isinstance(value, _PLAIN_TYPES):
            continue
        if not hasattr(dst, name):
            setattr(dst, name, value)


class FusedRMSNorm(nn.Module):
    """RMSNorm calling the fused kernel; forward(hidden_states, residual=None) like NanoVisionRMSNorm.

    `autocast_output`: under autocast, write the output in the autocast dtype. For a norm whose output only feeds
    projections: each projection would otherwise cast the fp32 output itself and keep its own low-precision copy
    for backward (three copies for q/k/v, two for gate/up); the numbers are the same. The norm's own backward then
    keeps that shared output instead of its fp32 input (bf16 outputs; fp16 ones keep the input), so its gradients carry
    the output's rounding, and weight entries smaller than 2^-64 in magnitude count as 2^-64
    (`ops.rms_norm.WEIGHT_FLOOR`).
    """

    def __init__(self, weight: Optional[nn.Parameter] = None, eps: float = 1e-6, autocast_output: bool = False):
        super().__init__()
        if weight is None:
            self.register_parameter("weight", None)
        else:
            self.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight)
        self.eps = float(eps)
        self.autocast_output = autocast_output

    @classmethod
    def from_module(cls, module: nn.Module, autocast_output: bool = False) -> "FusedRMSNorm":
        eps = getattr(module, "eps", getattr(module, "variance_epsilon", 1e-6))
        new = cls(getattr(module, "weight", None), eps, autocast_output)
        _adopt(module, new)
        return new

    def forward(self, hidden_states: torch.Tensor, residual: Optional[torch.Tensor] = None):
        device = hidden_states.device.type
        out_dtype = None
        if self.autocast_output and torch.is_autocast_enabled(device):
            out_dtype = torch.get_autocast_dtype(device)
        return dispatch.rms_norm(hidden_states, self.weight, self.eps, residual, out_dtype)

    def extra_repr(self) -> str:
        shape = tuple(self.weight.shape) if self.weight is not None else "no weight"
        return f"{shape}, eps={self.eps}, autocast_output={self.autocast_output}"


class FusedLayerNorm(nn.Module):
    """nn.LayerNorm over the last dim calling the fused kernel; forward(hidden_states, residual=None) returns the
    normalised output, or with `residual` (normalised hidden_states + residual, hidden_states + residual).

    Under autocast the output is fp32, as autocast's layer_norm gives, or with `autocast_output` in the autocast dtype:
    for a norm whose output only feeds projections, which would each cast it themselves (see FusedRMSNorm). The
    backward keeps the norm's input.

    Only compiled graphs run the Triton op: what it beats is inductor's generated LayerNorm backward (H200: 64 against
    ~115 us a launch at the 384 px tower's 13,824 x 768). Eagerly, aten's layer_norm is one launch with a fast
    backward, and the op's host time a call (~0.25 ms measured there) would cost more than it saves, so the same
    computation runs through the plain-torch reference.
    """

    def __init__(self, weight: Optional[nn.Parameter], bias: Optional[nn.Parameter], eps: float = 1e-5,
                 autocast_output: bool = False):
        super().__init__()
        for name, value in (("weight", weight), ("bias", bias)):
            if value is None:
                self.register_parameter(name, None)
            else:
                setattr(self, name, value if isinstance(value, nn.Parameter) else nn.Parameter(value))
        self.eps = float(eps)
        self.autocast_output = autocast_output

    @classmethod
    def from_module(cls, module: nn.LayerNorm, autocast_output: bool = False) -> "FusedLayerNorm":
        new = cls(module.weight, module.bias, module.eps, autocast_output)
        _adopt(module, new)
        return new

    def forward(self, hidden_states: torch.Tensor, residual: Optional[torch.Tensor] = None):
        device = hidden_states.device.type
        out_dtype = None
        if torch.is_autocast_enabled(device):
            out_dtype = torch.get_autocast_dtype(device) if self.autocast_output else torch.float32
        norm = dispatch.layer_norm if torch.compiler.is_compiling() else layer_norm_reference
        return norm(hidden_states, self.weight, self.bias, self.eps, residual, out_dtype)

    def extra_repr(self) -> str:
        shape = tuple(self.weight.shape) if self.weight is not None else "no weight"
        return (f"{shape}, eps={self.eps}, bias={self.bias is not None}, "
                f"autocast_output={self.autocast_output}")


class FusedSiglipEncoderLayer(SiglipEncoderLayer):
    """SiglipEncoderLayer whose FusedLayerNorm layer_norm2 also adds the attention's residual: the sum is written once
    and not read again for the norm, and the backward adds the residual's gradient in the norm's own kernel. Set as
    the class of an existing layer, so isinstance checks (transformers' output recording) still see a
    SiglipEncoderLayer."""

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor, **kwargs) -> torch.Tensor:
        residual = hidden_states
        hidden_states, _ = self.self_attn(
            hidden_states=self.layer_norm1(hidden_states), attention_mask=attention_mask, **kwargs)
        hidden_states, residual = self.layer_norm2(hidden_states, residual)
        return residual + self.mlp(hidden_states)


class FusedSiglipAttention(SiglipAttention):
    """SiglipAttention with its q/k/v projections as one GEMM (`fused_qkv`). Set as the class of an existing module,
    like FusedSiglipEncoderLayer."""

    def forward(self, hidden_states: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, **kwargs):
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        queries, keys, values = (t.view(hidden_shape).transpose(1, 2) for t in fused_qkv(self, hidden_states))
        attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation,
                                                                    eager_attention_forward)
        attn_output, attn_weights = attention_interface(
            self, queries, keys, values, attention_mask, is_causal=self.is_causal, scaling=self.scale,
            dropout=0.0 if not self.training else self.dropout)
        return self.out_proj(attn_output.reshape(*input_shape, -1).contiguous()), attn_weights


def _is_plain_layer_norm(module: nn.Module) -> bool:
    return type(module) is nn.LayerNorm and len(module.normalized_shape) == 1


def _is_plain_linear(module: nn.Module) -> bool:
    """Whether calling `module` is exactly F.linear(input, module.weight, module.bias): an nn.Linear, or a subclass
    that keeps its forward (NanoVisionZeroInitLinear), with no module or global hooks (tensor parallelism, LoRA
    wrappers, quantised or float8 linears and hook-based tools all fail this and keep their own forward)."""
    from torch.nn.modules import module as _module

    if not isinstance(module, nn.Linear) or type(module).forward is not nn.Linear.forward:
        return False
    local = (module._forward_hooks, module._forward_pre_hooks, module._backward_hooks, module._backward_pre_hooks)
    global_ = (_module._global_forward_hooks, _module._global_forward_pre_hooks, _module._global_backward_hooks,
               _module._global_backward_pre_hooks)
    return not any(local) and not any(global_)


def _packed_projection(projections, hidden_states: torch.Tensor) -> torch.Tensor | None:
    """One GEMM over the concatenated weights of projections of the same input -> [..., sum of their widths]; None
    where they are not all plain linears (adapters, tensor-parallel hooks) or mix biased and unbiased ones."""
    biased = {p.bias is not None for p in projections if isinstance(p, nn.Linear)}
    if not all(_is_plain_linear(p) for p in projections) or len(biased) != 1:
        return None
    weight = torch.cat([p.weight for p in projections])
    bias = torch.cat([p.bias for p in projections]) if biased == {True} else None
    return nn.functional.linear(hidden_states, weight, bias)


def fused_qkv(attention: nn.Module, hidden_states: torch.Tensor):
    """The q/k/v projections as one GEMM over their concatenated weights; the outputs are slices of its result.
    Under autocast that is one cast of the fp32 weights instead of three, and the backward runs one input-gradient and
    one weight-gradient GEMM instead of three each (and no sum of three input gradients): fewer, larger kernels in a
    step whose small ones are bound by their launches. Same values as the three linears, to GEMM rounding. Projections
    that are not plain linears, or a mix of biased and unbiased ones, keep their own calls."""
    projections = (attention.q_proj, attention.k_proj, attention.v_proj)
    out = _packed_projection(projections, hidden_states)
    if out is None:
        return tuple(p(hidden_states) for p in projections)
    return out.split([p.out_features for p in projections], dim=-1)


def fused_qkv_rotary(attention: nn.Module, hidden_states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """`fused_qkv`'s GEMM, then the rotary embedding on its packed output (`apply_rotary_qkv`) -> q [B, Hq, T, D],
    k and v [B, Hk, T, D]. The rotary's backward writes the GEMM output's gradient in one pass, where slices of it
    would leave autograd to concatenate the q, k and v gradients. Projections that `fused_qkv` keeps apart are
    concatenated first."""
    projections = (attention.q_proj, attention.k_proj, attention.v_proj)
    packed = _packed_projection(projections, hidden_states)
    if packed is None:
        packed = torch.cat([p(hidden_states) for p in projections], dim=-1)
    config = attention.config
    return dispatch.apply_rotary_qkv(packed, cos, sin, config.num_attention_heads, config.num_key_value_heads)


class FusedMLP(nn.Module):
    """down_proj(swiglu(gate_proj(x), up_proj(x))) or down_proj(relu2(up_proj(x))); the activation and a plain
    nn.Linear down_proj run as one op that does not keep the activation for backward."""

    def __init__(self, mlp_type: str = "swiglu"):
        super().__init__()
        if mlp_type not in ("swiglu", "relu2"):
            raise ValueError(f"mlp_type must be 'swiglu' or 'relu2', got {mlp_type!r}")
        self.mlp_type = mlp_type

    @classmethod
    def from_module(cls, module: nn.Module) -> "FusedMLP":
        new = cls(getattr(module, "mlp_type", "swiglu"))
        _adopt(module, new)  # gate_proj / up_proj / down_proj in their original order
        needed = ("gate_proj", "up_proj", "down_proj") if new.mlp_type == "swiglu" else ("up_proj", "down_proj")
        missing = [n for n in needed if n not in new._modules]
        if missing:
            raise ValueError(f"{type(module).__name__} has no {missing} for mlp_type={new.mlp_type!r}")
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        down = self.down_proj
        fuse_down = _is_plain_linear(down)
        # gate and up as one GEMM where the fused op takes its packed output as is: the op writes its gradient as one
        # tensor too, so the backward runs one input-gradient GEMM and no sum of two (as for q/k/v)
        gate_up = None
        if fuse_down and self.mlp_type == "swiglu":
            gate_up = _packed_projection((self.gate_proj, self.up_proj), x)
        if gate_up is None:
            gate = self.gate_proj(x) if self.mlp_type == "swiglu" else None
            up = self.up_proj(x)
        if fuse_down:
            # The activation and down projection as one op, which keeps gate/up (kept anyway for the activation's
            # backward) but not the activation itself (B*T*intermediate) that down_proj would keep for its weight
            # gradient. The weight is cast here, as an autocast linear would, so that autograd's cast turns the
            # low-precision weight gradient into the fp32 master one.
            device = x.device.type
            dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else down.weight.dtype
            if gate_up is not None:
                act_dtype = gate_up.dtype
            else:
                act_dtype = up.dtype if gate is None else torch.promote_types(gate.dtype, up.dtype)
            if act_dtype == dtype:  # else down_proj(h) would cast h or fail: leave that to it
                weight = down.weight.to(dtype)
                bias = None if down.bias is None else down.bias.to(dtype)
                if gate_up is not None:
                    return dispatch.swiglu_linear_packed(gate_up, weight, bias)
                if gate is None:
                    return dispatch.relu2_linear(up, weight, bias)
                return dispatch.swiglu_linear(gate, up, weight, bias)
            if gate_up is not None:
                gate, up = gate_up.chunk(2, dim=-1)
        return down(dispatch.relu2(up) if gate is None else dispatch.swiglu(gate, up))

    def extra_repr(self) -> str:
        return f"mlp_type={self.mlp_type!r}"


def apply_fused_kernels(model: nn.Module, ops: Optional[Iterable[str]] = None) -> nn.Module:
    """Swap in fused kernels on this model instance (in place) and return it.

    ops: None for all that apply to the model, or a subset of FUSED_KERNEL_OPS ("rms_norm", "swiglu", "rope",
    "linear_cross_entropy", "layer_norm"): a named op that matches no module is warned about. The applied ops are
    recorded as `model.fused_kernel_ops`.
    """
    global _LOGGED
    if ops is None:
        selected = FUSED_KERNEL_OPS
    else:
        requested = (ops,) if isinstance(ops, str) else tuple(ops)
        unknown = [o for o in requested if o not in FUSED_KERNEL_OPS]
        if unknown:
            raise ValueError(f"unknown fused kernel op(s) {unknown}; valid ops are {list(FUSED_KERNEL_OPS)}")
        selected = tuple(o for o in FUSED_KERNEL_OPS if o in requested)

    counts = dict.fromkeys(selected, 0)
    replaced = {}  # id(original) -> replacement, so shared modules stay shared

    def _swap(parent: nn.Module, name: str, child: nn.Module, op: str, factory) -> None:
        new = replaced.get(id(child))
        if new is None:
            new = replaced[id(child)] = factory(child)
            counts[op] += 1
        parent._modules[name] = new

    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            cls_name = type(child).__name__
            if "rms_norm" in counts and cls_name in RMSNORM_CLASS_NAMES:
                _swap(parent, name, child, "rms_norm", lambda module: FusedRMSNorm.from_module(
                    module, autocast_output=name in PROJECTION_INPUT_NORMS))
            elif "swiglu" in counts and cls_name in MLP_CLASS_NAMES:
                _swap(parent, name, child, "swiglu", FusedMLP.from_module)
            elif "layer_norm" in counts and _is_plain_layer_norm(child):
                feeds_projections = type(parent) is SiglipEncoderLayer and name in SIGLIP_PROJECTION_INPUT_NORMS
                _swap(parent, name, child, "layer_norm", lambda module: FusedLayerNorm.from_module(
                    module, autocast_output=feeds_projections))

    for module in model.modules():
        cls_name = type(module).__name__
        if "rope" in counts and cls_name in ATTENTION_CLASS_NAMES:
            module.rotary_fn = dispatch.apply_rotary
            module.qkv_fn = fused_qkv
            module.qkv_rotary_fn = fused_qkv_rotary
            counts["rope"] += 1
        if "linear_cross_entropy" in counts and cls_name in LM_CLASS_NAMES:
            module.linear_cross_entropy = dispatch.fused_linear_cross_entropy
            counts["linear_cross_entropy"] += 1
        if ("layer_norm" in counts and type(module) is SiglipEncoderLayer
                and isinstance(module.layer_norm2, FusedLayerNorm)):
            module.__class__ = FusedSiglipEncoderLayer
            if type(module.self_attn) is SiglipAttention:
                module.self_attn.__class__ = FusedSiglipAttention

    previous = tuple(getattr(model, "fused_kernel_ops", ()) or ())
    model.fused_kernel_ops = tuple(o for o in FUSED_KERNEL_OPS if o in previous or counts.get(o, 0) > 0)

    if not _LOGGED:
        logger.info(dispatch.describe_backends())
        _LOGGED = True
    logger.debug("nanovision: fused kernels applied: %s", ", ".join(f"{k}={v}" for k, v in counts.items()))
    for op, n in counts.items():
        if n == 0 and ops is not None:
            logger.warning("nanovision: fused kernel op %r matched no module in %s", op, type(model).__name__)
    return model
