"""The fused modules and `apply_fused_kernels` (nanovision/kernels/layers.py) on stand-in modules with the model's
interface: the same outputs and gradients as the modules they replace, and what autograd keeps."""

import copy
import logging
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from conftest import BF16, DEVICE, F32, assert_close, leaf, rand, record_launches, rotary_angles, seed_case
from torch import nn

pytest.importorskip("triton")
import nanovision.kernels as K  # noqa: E402
from nanovision.kernels import dispatch  # noqa: E402
from nanovision.kernels import layers as L  # noqa: E402
from nanovision.kernels.ops import rms_norm as rms_norm_ops  # noqa: E402
from nanovision.kernels.ops.rope import apply_rotary_reference  # noqa: E402
from nanovision.modeling_nanovision import NanoVisionZeroInitLinear  # noqa: E402


def saved_bytes(fn, dtype=BF16):
    """nbytes of each distinct storage autograd keeps while fn() runs under autocast to `dtype` (storages, not shapes:
    linear may save a 2D view of its input)."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast(DEVICE, dtype=dtype):
            fn()
    return list(storages.values())



# --------------------------------------------------------------------------- #
# apply_fused_kernels on stand-in modules with the model's interface
# --------------------------------------------------------------------------- #
class NanoVisionRMSNorm(nn.Module):
    def __init__(self, hidden, eps=1e-6, with_weight=True):
        super().__init__()
        self.weight = nn.Parameter(1.0 + 0.1 * torch.randn(hidden)) if with_weight else None
        self.eps = eps

    def _norm(self, x):
        y = (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)
        return y * self.weight if self.weight is not None else y

    def forward(self, hidden_states, residual=None):
        if residual is None:
            return self._norm(hidden_states)
        hidden_states = hidden_states + residual
        return self._norm(hidden_states), hidden_states


class NanoVisionTextMLP(nn.Module):
    def __init__(self, hidden, inter, mlp_type):
        super().__init__()
        self.mlp_type = mlp_type
        if mlp_type == "swiglu":
            self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)

    def forward(self, x):
        if self.mlp_type == "swiglu":
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(torch.relu(self.up_proj(x)) ** 2)


class NanoVisionTextAttention(nn.Module):
    def __init__(self, hidden, n_heads, n_kv, head_dim):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = n_heads, n_kv, head_dim
        self.q_proj = nn.Linear(hidden, n_heads * head_dim, bias=False)
        self.k_proj = nn.Linear(hidden, n_kv * head_dim, bias=False)
        self.v_proj = nn.Linear(hidden, n_kv * head_dim, bias=False)
        self.o_proj = nn.Linear(n_heads * head_dim, hidden, bias=False)
        self.rotary_fn = apply_rotary_reference

    def forward(self, x, cos, sin):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = self.rotary_fn(q, k, cos, sin)
        rep = self.n_heads // self.n_kv
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(o.transpose(1, 2).reshape(B, T, -1))


class _Layer(nn.Module):
    def __init__(self, hidden, mlp_type, norm_weight):
        super().__init__()
        self.input_layernorm = NanoVisionRMSNorm(hidden, with_weight=norm_weight)
        self.self_attn = NanoVisionTextAttention(hidden, 4, 2, hidden // 4)
        self.post_attention_layernorm = NanoVisionRMSNorm(hidden)
        self.mlp = NanoVisionTextMLP(hidden, 2 * hidden + 4, mlp_type)

    def forward(self, x, residual, cos, sin):
        if residual is None:
            h, residual = self.input_layernorm(x), x
        else:
            h, residual = self.input_layernorm(x, residual)
        h = self.self_attn(h, cos, sin)
        h, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(h), residual


class NanoVisionForCausalLM(nn.Module):
    def __init__(self, vocab=97, hidden=32, softcap=4.0):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, hidden)
        self.layers = nn.ModuleList([_Layer(hidden, "swiglu", True), _Layer(hidden, "relu2", False)])
        self.norm = NanoVisionRMSNorm(hidden)
        self.lm_head = nn.Linear(hidden, vocab, bias=False)
        self.final_logit_softcapping = softcap
        self.linear_cross_entropy = None

    def forward(self, input_ids, labels):
        B, T = input_ids.shape
        D = self.layers[0].self_attn.head_dim
        dev = input_ids.device
        inv = 1.0 / (10000 ** (torch.arange(0, D, 2, dtype=torch.float32, device=dev) / D))
        freqs = torch.arange(T, dtype=torch.float32, device=dev)[:, None] * inv
        emb = torch.cat((freqs, freqs), -1)[None]
        cos, sin = emb.cos(), emb.sin()
        x, residual = self.embed_tokens(input_ids), None
        for layer in self.layers:
            x, residual = layer(x, residual, cos, sin)
        h, _ = self.norm(x, residual)
        hs = h[:, :-1].reshape(-1, h.shape[-1])
        shift = labels[:, 1:].reshape(-1)
        if self.linear_cross_entropy is not None:
            return self.linear_cross_entropy(hs, self.lm_head.weight, shift, ignore_index=-100, reduction="mean",
                                             softcap=self.final_logit_softcapping, num_items_in_batch=None)
        logits = self.lm_head(hs).float()
        logits = self.final_logit_softcapping * torch.tanh(logits / self.final_logit_softcapping)
        return F.cross_entropy(logits, shift, ignore_index=-100)


def _model():
    seed_case("model")
    return NanoVisionForCausalLM().to(DEVICE)


def _batch():
    ids = torch.randint(0, 97, (2, 9), device=DEVICE)
    labels = ids.clone()
    labels[0, :3] = -100
    return ids, labels


def test_apply_fused_kernels_matches_original(caplog):
    ref = _model()
    model = copy.deepcopy(ref)
    keys_before = list(model.state_dict().keys())
    params_before = {n: p for n, p in model.named_parameters()}
    L._LOGGED = False
    with caplog.at_level(logging.INFO, logger="nanovision"):
        out_model = K.apply_fused_kernels(model)
        K.apply_fused_kernels(model)  # idempotent; logs only once
    assert out_model is model
    assert sum("nanovision kernels:" in r.getMessage() for r in caplog.records) == 1
    assert list(model.state_dict().keys()) == keys_before
    for n, p in model.named_parameters():
        assert p is params_before[n], n
    assert model.fused_kernel_ops == ("rms_norm", "swiglu", "rope", "linear_cross_entropy")
    assert isinstance(model.norm, K.FusedRMSNorm)
    assert model.layers[1].input_layernorm.weight is None
    assert isinstance(model.layers[0].mlp, K.FusedMLP) and model.layers[1].mlp.mlp_type == "relu2"
    assert model.layers[0].self_attn.rotary_fn is K.apply_rotary
    assert model.layers[0].self_attn.qkv_fn is L.fused_qkv
    assert model.layers[0].self_attn.qkv_rotary_fn is L.fused_qkv_rotary
    assert model.linear_cross_entropy is K.fused_linear_cross_entropy
    assert "NanoVisionRMSNorm" not in {type(m).__name__ for m in model.modules()}
    assert type(ref.norm).__name__ == "NanoVisionRMSNorm"  # other instances untouched

    ids, labels = _batch()
    loss_ref, loss = ref(ids, labels), model(ids, labels)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-5)
    loss_ref.backward()
    loss.backward()
    ref_grads = dict(ref.named_parameters())
    for n, p in model.named_parameters():
        assert p.grad is not None, n
        torch.testing.assert_close(p.grad, ref_grads[n].grad, rtol=1e-4, atol=1e-5, msg=n)


@pytest.mark.parametrize("bias", [False, True])
def test_fused_qkv_matches_three_projections(bias):
    """One GEMM over the concatenated q/k/v weights: the three projections' outputs and gradients (float64); the input
    and weight gradients flow through the slices and the concatenation back to each Linear."""
    from nanovision.modeling_nanovision import project_qkv

    seed_case("fused_qkv", bias)
    attention = nn.Module()
    for name, width in (("q_proj", 48), ("k_proj", 16), ("v_proj", 16)):
        setattr(attention, name, nn.Linear(32, width, bias=bias, device=DEVICE, dtype=torch.float64))
    reference = copy.deepcopy(attention)
    x1 = leaf(rand(2, 5, 32, dtype=torch.float64))
    x2 = leaf(x1)
    fused, plain = L.fused_qkv(attention, x1), project_qkv(reference, x2)
    assert [t.shape for t in fused] == [t.shape for t in plain]
    grads = [rand(*t.shape, dtype=torch.float64) for t in plain]
    sum((a * g).sum() for a, g in zip(fused, grads)).backward()
    sum((a * g).sum() for a, g in zip(plain, grads)).backward()
    for a, b in zip(fused, plain):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(x1.grad, x2.grad)
    reference_params = dict(reference.named_parameters())
    for name, p in attention.named_parameters():
        torch.testing.assert_close(p.grad, reference_params[name].grad, msg=name)


def test_fused_qkv_keeps_projections_that_are_not_plain_linears():
    attention = nn.Module()
    for name in ("q_proj", "k_proj", "v_proj"):
        setattr(attention, name, nn.Linear(8, 8, device=DEVICE))
    calls = []
    attention.k_proj.register_forward_hook(lambda module, args, out: calls.append("k") or out * 2)
    x = rand(3, 8)
    q, k, v = L.fused_qkv(attention, x)
    assert calls == ["k"]
    torch.testing.assert_close(k, attention.k_proj.weight.new_tensor(2.0) * F.linear(x, attention.k_proj.weight,
                                                                                      attention.k_proj.bias))


@pytest.mark.parametrize("hooked", [False, True])
def test_fused_qkv_rotary_matches_projections_then_rotary(poison, hooked):
    """One GEMM + the packed rotary: the same q/k/v and input/weight gradients as three projections, the model's
    views and the reference rotary; a hooked projection (not a plain linear) keeps its own call and is concatenated."""
    seed_case("fused_qkv_rotary", hooked)
    attention = nn.Module()
    for name, width in (("q_proj", 64), ("k_proj", 32), ("v_proj", 32)):
        setattr(attention, name, nn.Linear(24, width, bias=False, device=DEVICE))
    attention.config = SimpleNamespace(num_attention_heads=2, num_key_value_heads=1)
    reference = copy.deepcopy(attention)
    if hooked:
        for module in (attention, reference):
            module.k_proj.register_forward_hook(lambda module, args, out: out * 2)
    x1 = leaf(rand(2, 5, 24))
    x2 = leaf(x1)
    cos, sin = rotary_angles(1, 5, 32, F32)
    fused = L.fused_qkv_rotary(attention, x1, cos, sin)
    q, k, v = (projection(x2).view(2, 5, -1, 32).transpose(1, 2)
               for projection in (reference.q_proj, reference.k_proj, reference.v_proj))
    plain = (*apply_rotary_reference(q, k, cos, sin), v)
    grads = [rand(*t.shape) for t in plain]
    sum((a * g).sum() for a, g in zip(fused, grads)).backward()
    sum((a * g).sum() for a, g in zip(plain, grads)).backward()
    for name, a, b in zip("qkv", fused, plain):
        assert_close(a, b, F32, name)
    assert_close(x1.grad, x2.grad, F32, "dx")
    reference_params = dict(reference.named_parameters())
    for name, p in attention.named_parameters():
        assert_close(p.grad, reference_params[name].grad, F32, name)


def test_apply_fused_kernels_subset_and_validation():
    model = _model()
    K.apply_fused_kernels(model, ops=["rms_norm"])
    assert model.fused_kernel_ops == ("rms_norm",)
    assert isinstance(model.layers[0].input_layernorm, K.FusedRMSNorm)
    assert type(model.layers[0].mlp).__name__ == "NanoVisionTextMLP"
    assert model.layers[0].self_attn.rotary_fn is apply_rotary_reference
    assert model.linear_cross_entropy is None
    K.apply_fused_kernels(model, ops={"rope"})
    assert model.fused_kernel_ops == ("rms_norm", "rope")
    assert model.layers[1].self_attn.rotary_fn is K.apply_rotary
    with pytest.raises(ValueError, match="linear_cross_entropy"):
        K.apply_fused_kernels(model, ops=["rms_norm", "flash_attention"])


def test_only_ops_named_explicitly_warn_when_they_match_nothing(caplog):
    """ops=None (what use_fused_kernels=True asks for) applies what fits: a text model has no LayerNorm, and says
    nothing of it; an op the caller names and the model lacks is warned about."""
    with caplog.at_level(logging.WARNING, logger="nanovision"):
        model = K.apply_fused_kernels(_model())
    assert "layer_norm" not in model.fused_kernel_ops
    assert not [r for r in caplog.records if "matched no module" in r.getMessage()]
    with caplog.at_level(logging.WARNING, logger="nanovision"):
        K.apply_fused_kernels(_model(), ops=["rms_norm", "layer_norm"])
    assert [r.getMessage() for r in caplog.records if "matched no module" in r.getMessage()] == [
        "nanovision: fused kernel op 'layer_norm' matched no module in NanoVisionForCausalLM"]


def test_fused_modules_standalone():
    seed_case("modules")
    norm = NanoVisionRMSNorm(64).to(DEVICE)
    fused = K.FusedRMSNorm.from_module(norm)
    assert fused.weight is norm.weight and fused.eps == norm.eps
    x, r = rand(3, 5, 64), rand(3, 5, 64)
    torch.testing.assert_close(fused(x), norm(x))
    for a, b in zip(fused(x, r), norm(x, r)):
        torch.testing.assert_close(a, b)
    for mlp_type in ("swiglu", "relu2"):
        mlp = NanoVisionTextMLP(64, 100, mlp_type).to(DEVICE)
        fmlp = K.FusedMLP.from_module(mlp)
        assert list(fmlp.state_dict()) == list(mlp.state_dict())
        x1, x2 = leaf(rand(2, 7, 64)), None
        x2 = leaf(x1)
        y1, y2 = fmlp(x1), mlp(x2)
        torch.testing.assert_close(y1, y2, rtol=1e-5, atol=1e-5)
        (g1,), (g2,) = torch.autograd.grad(y1.sum(), (x1,)), torch.autograd.grad(y2.sum(), (x2,))
        torch.testing.assert_close(g1, g2, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("with_residual", [False, True])
def test_fused_rms_norm_autocast_output_keeps_no_fp32_activation(with_residual):
    """Under bf16 autocast the norm keeps its bf16 output, which the projection after it keeps anyway (one storage),
    instead of the fp32 input or residual sum, whatever its weight holds; under fp16 autocast it keeps the fp32
    tensor."""
    seed_case("rms_saved", with_residual)
    norm = K.FusedRMSNorm(nn.Parameter(rand(64, scale=0.3, offset=1.0)), autocast_output=True)
    proj = nn.Linear(64, 48, bias=False).to(DEVICE)
    x, r = leaf(rand(2, 5, 64)), leaf(rand(2, 5, 64))
    act = x.numel()  # bf16 output: 2 * act bytes, fp32 input or sum: 4 * act; no other saved tensor has these sizes

    def step():
        proj(norm(x, r)[0] if with_residual else norm(x))

    new = saved_bytes(step)
    assert 4 * act not in new and new.count(2 * act) == 1, new
    with torch.no_grad():
        norm.weight[0] = 0.0
    assert saved_bytes(step) == new
    fp16 = saved_bytes(step, torch.float16)
    assert fp16.count(4 * act) == 1 and sum(fp16) - sum(new) == 4 * act, (fp16, new)


@pytest.mark.parametrize("with_residual", [False, True])
def test_fused_layer_norm_runs_the_kernels_in_compiled_graphs_only(monkeypatch, with_residual):
    """nn.LayerNorm's numbers either way (under bf16 autocast: fp32 out, or bf16 with autocast_output); eagerly
    through aten's layer_norm, compiled through the Triton kernels (forward and backward)."""
    seed_case("ln_module", with_residual)
    torch_norm = nn.LayerNorm(64, eps=1e-6).to(DEVICE)
    with torch.no_grad():
        torch_norm.weight.copy_(rand(64, scale=0.3, offset=1.0))
        torch_norm.bias.copy_(rand(64))
    launches = record_launches(monkeypatch, rms_norm_ops)
    x, r, gy = rand(2, 5, 64, offset=2.0), rand(2, 5, 64), rand(2, 5, 64)
    for autocast_output in (False, True):
        norm = K.FusedLayerNorm.from_module(torch_norm, autocast_output=autocast_output)
        assert norm.weight is torch_norm.weight and norm.bias is torch_norm.bias and norm.eps == 1e-6

        def run(module, fused):
            inputs = [leaf(t) for t in ((x, r) if with_residual else (x,))]
            if fused:
                with torch.autocast(torch.device(DEVICE).type, dtype=torch.bfloat16):
                    out = module(*inputs)
            else:  # what CUDA autocast does: layer_norm in fp32, then a projection casting its output
                out = torch_norm(inputs[0] + inputs[1] if with_residual else inputs[0])
                out = out.to(torch.bfloat16) if autocast_output else out
            y = out[0] if with_residual and fused else out
            grads = torch.autograd.grad((y.float() * gy).sum(), [*inputs, torch_norm.weight, torch_norm.bias])
            return y, grads

        want, want_grads = run(None, fused=False)
        for compiled in (False, True):
            del launches[:]
            torch._dynamo.reset()
            got, got_grads = run(torch.compile(norm) if compiled else norm, fused=True)
            assert len(launches) == (2 if compiled else 0), (compiled, len(launches))
            assert got.dtype == (BF16 if autocast_output else F32)
            # the CPU interpreter rounds bf16 stores toward zero: one ulp there
            torch.testing.assert_close(got, want, rtol=2**-7 if autocast_output else 1e-5, atol=1e-5)
            for g, e in zip(got_grads, want_grads):
                torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)


def _mlp_pair(mlp_type, bias, case="mlp_pair"):
    """(FusedMLP, the same weights taking the old path): the model's NanoVisionZeroInitLinear down_proj, and a no-op
    hook on the copy's, which makes FusedMLP call it as a module (activation, then down_proj(h))."""
    seed_case(case, mlp_type, bias)
    mlp = NanoVisionTextMLP(32, 72, mlp_type)
    mlp.down_proj = NanoVisionZeroInitLinear(72, 32, bias=bias)
    nn.init.normal_(mlp.down_proj.weight, std=0.1)
    fused = K.FusedMLP.from_module(mlp.to(DEVICE))
    old = copy.deepcopy(fused)
    old.down_proj.register_forward_hook(lambda module, args, out: None)
    return fused, old


@pytest.mark.parametrize("mlp_type", ["swiglu", "relu2"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("autocast", [False, True])
def test_fused_mlp_act_linear_matches_old_path(monkeypatch, mlp_type, bias, autocast):
    fused, old = _mlp_pair(mlp_type, bias)
    calls = []
    for name in ("swiglu_linear_packed", "swiglu_linear", "relu2_linear"):
        real = getattr(dispatch, name)
        monkeypatch.setattr(dispatch, name, lambda *a, _real=real, _name=name: calls.append(_name) or _real(*a))
    x1 = leaf(rand(2, 5, 32))
    x2 = leaf(x1)
    with torch.autocast(DEVICE, dtype=BF16, enabled=autocast):
        y1, y2 = fused(x1), old(x2)
    # the fused op ran for `fused` only, on gate and up from one GEMM
    assert calls == ["swiglu_linear_packed" if mlp_type == "swiglu" else "relu2_linear"]
    assert y1.dtype == (BF16 if autocast else F32)
    # the same ops on the same numbers: equal outputs (weight gradients: the same sums, possibly in another order)
    torch.testing.assert_close(y1, y2, rtol=0, atol=0)
    go = rand(*y1.shape)
    (y1.float() * go).sum().backward()
    (y2.float() * go).sum().backward()
    tol = dict(rtol=1e-2, atol=1e-3) if autocast else dict(rtol=1e-5, atol=1e-6)
    if autocast and mlp_type == "swiglu":
        # the input gradient: one GEMM over the packed gate/up gradient, against two whose bf16 outputs are summed
        # (one more rounding): both against float64
        ref = copy.deepcopy(old).double()
        x64 = leaf(x1.detach().double())
        (ref(x64) * go.double()).sum().backward()
        for grad in (x1.grad, x2.grad):
            assert_close(grad, x64.grad, BF16, "dx")
    else:
        torch.testing.assert_close(x1.grad, x2.grad, **tol)
    old_params = dict(old.named_parameters())
    for name, p in fused.named_parameters():
        assert p.grad.dtype == F32, name  # the fp32 master gradient, through autograd's cast
        torch.testing.assert_close(p.grad, old_params[name].grad, **tol, msg=name)


@pytest.mark.parametrize("mlp_type", ["swiglu", "relu2"])
def test_fused_mlp_does_not_save_the_activation(mlp_type):
    """Under bf16 autocast the old path's down_proj keeps its own bf16 copy of h = act(gate, up); the fused op keeps
    only gate/up (which the activation's backward needs anyway): for swiglu as the one packed output of their GEMM."""
    fused, old = _mlp_pair(mlp_type, bias=False)
    x = leaf(rand(2, 5, 32))
    h_bytes = 2 * 5 * 72 * 2  # bf16 [2, 5, 72]; no other saved tensor has this size (nor twice it)

    new, before = saved_bytes(lambda: fused(x)), saved_bytes(lambda: old(x))
    if mlp_type == "swiglu":  # old: gate, up and h; fused: gate/up packed
        assert before.count(h_bytes) == 3 and new.count(h_bytes) == 0 and new.count(2 * h_bytes) == 1, (before, new)
    else:  # old: up and h; fused: up
        assert before.count(h_bytes) == 2 and new.count(h_bytes) == 1, (before, new)
    assert sum(before) - sum(new) >= h_bytes, (before, new)
