"""Training-step throughput on one GPU: nanovision against transformers' LlamaForCausalLM (+ torch.compile), in one run.

Shape (nanochat d20-like): 20 layers, hidden 1280, 10 query heads of 128, 5 KV heads, SwiGLU 3456, vocab 50304,
untied embeddings, seq 2048, micro-batch 8, bf16 autocast over fp32 master weights, torch fused AdamW; a step is
forward + loss + backward + optimizer step. Also packed training (log-normal documents packed into 2048-token rows)
against full-length rows, and packed attention alone against dense causal attention.

    python benchmarks/train_step.py --out benchmarks/results/train_step.json [--variants ...] [--smoke]
"""

import argparse
import contextlib
import gc
import json
import math
import statistics
import time
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import AutoModelForCausalLM, LlamaConfig

import nanovision
from nanovision.kernels import describe_backends, document_bounds
from nanovision.modeling_nanovision import NanoVisionDecoderLayer
from nanovision.training.trainer import flops_per_token

SHAPE = dict(layers=20, hidden=1280, heads=10, kv_heads=5, head_dim=128, ffn=3456, vocab=50304, seq=2048, batch=8)
SMOKE = dict(layers=2, hidden=256, heads=4, kv_heads=2, head_dim=64, ffn=640, vocab=1024, seq=256, batch=2)


def llama_model(s, attn):
    config = LlamaConfig(vocab_size=s["vocab"], hidden_size=s["hidden"], intermediate_size=s["ffn"],
                         num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
                         num_key_value_heads=s["kv_heads"], head_dim=s["head_dim"], max_position_embeddings=s["seq"],
                         tie_word_embeddings=False)
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn)


def nanovision_model(s, attn, block, fused):
    preset = nanovision.presets.text_config if block == "llama" else nanovision.presets.nanochat_config
    config = preset(depth=s["layers"], head_dim=s["head_dim"], vocab_size=s["vocab"], max_position_embeddings=s["seq"])
    # pin the exact shape (the presets derive it from depth; the smoke shape is not depth-scaled)
    config.update(dict(hidden_size=s["hidden"], num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"],
                       intermediate_size=s["ffn"] if block == "llama" else 4 * s["hidden"], use_fused_kernels=fused))
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn)


def fp32_norm_outputs(model):
    """The fused model as it was before its layer norms wrote their outputs in the autocast dtype (ablation)."""
    for module in model.modules():
        if hasattr(module, "autocast_output"):
            module.autocast_output = False
    return model


class OwnInputNorm(torch.nn.Module):
    """A pass-through wrapper around a decoder layer: the model hands a wrapped layer's input norm to no other layer
    (as for an FSDP unit), so the layer norms its own input."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, *args, **kwargs):
        return self.layer(*args, **kwargs)


def layers_norm_own_input(model):
    """The fused model as it was before each layer ran the next layer's input norm with its residual add (ablation):
    every decoder layer wrapped."""
    for module in list(model.modules()):
        if isinstance(module, torch.nn.ModuleList) and all(isinstance(m, NanoVisionDecoderLayer) for m in module):
            for index, layer in enumerate(module):
                module[index] = OwnInputNorm(layer)
    return model


def mlp_keeps_activation(model):
    """The fused model as it was before its MLP rebuilt the activation in backward (ablation): a no-op hook on each
    down projection sends FusedMLP down its unfused path, where down_proj keeps its own copy of the activation."""
    for module in model.modules():
        if type(module).__name__ == "FusedMLP":
            module.down_proj.register_forward_hook(lambda *args: None)
    return model


def gate_up_apart(model):
    """The fused model as it was before gate and up ran as one GEMM (ablation): a no-op hook on each gate projection
    sends FusedMLP to the two projections, whose outputs the activation + down projection op takes separately."""
    for module in model.modules():
        if type(module).__name__ == "FusedMLP":
            module.gate_proj.register_forward_hook(lambda *args: None)
    return model


def rotary_after_split(model):
    """The fused model as it was before the rotary took the packed q/k/v GEMM output (ablation): the rotary on q/k
    slices of it, and autograd concatenating the q, k and v gradients."""
    for module in model.modules():
        if hasattr(module, "qkv_rotary_fn"):
            module.qkv_rotary_fn = None
    return model


def separate_qkv(model):
    """The fused model as it was before q/k/v ran as one GEMM (ablation): each attention's three projections again."""
    from nanovision.modeling_nanovision import project_qkv

    for module in rotary_after_split(model).modules():
        if hasattr(module, "qkv_fn"):
            module.qkv_fn = project_qkv
    return model


# name -> (builder, sdpa backend or None, compile: False, True or torch.compile's keyword arguments)
VARIANTS = {
    "llama sdpa (eager)": (lambda s: llama_model(s, "sdpa"), None, False),
    "llama sdpa + compile": (lambda s: llama_model(s, "sdpa"), None, True),
    "nanovision llama-block sdpa": (lambda s: nanovision_model(s, "sdpa", "llama", False), None, False),
    "+ fused kernels": (lambda s: nanovision_model(s, "sdpa", "llama", True), None, False),
    "+ fused kernels + cuDNN, fp32 norm outputs": (lambda s: fp32_norm_outputs(nanovision_model(s, "sdpa", "llama",
                                                                                                  True)),
                                                   SDPBackend.CUDNN_ATTENTION, False),
    "+ fused kernels + cuDNN, MLP keeps its activation": (
        lambda s: mlp_keeps_activation(nanovision_model(s, "sdpa", "llama", True)), SDPBackend.CUDNN_ATTENTION, False),
    "+ fused kernels + cuDNN, three q/k/v GEMMs": (
        lambda s: separate_qkv(nanovision_model(s, "sdpa", "llama", True)), SDPBackend.CUDNN_ATTENTION, False),
    "+ fused kernels + cuDNN attention": (lambda s: nanovision_model(s, "sdpa", "llama", True),
                                          SDPBackend.CUDNN_ATTENTION, False),
    "+ fused kernels + cuDNN + compile": (lambda s: nanovision_model(s, "sdpa", "llama", True),
                                          SDPBackend.CUDNN_ATTENTION, True),
    "+ fused kernels + cuDNN + compile max-autotune": (lambda s: nanovision_model(s, "sdpa", "llama", True),
                                                       SDPBackend.CUDNN_ATTENTION,
                                                       dict(mode="max-autotune-no-cudagraphs")),
    "+ fused kernels + cuDNN + compile reduce-overhead": (lambda s: nanovision_model(s, "sdpa", "llama", True),
                                                          SDPBackend.CUDNN_ATTENTION, dict(mode="reduce-overhead")),
    "+ fused kernels + cuDNN + compile, layers norm their own input": (
        lambda s: layers_norm_own_input(nanovision_model(s, "sdpa", "llama", True)), SDPBackend.CUDNN_ATTENTION, True),
    "+ fused kernels + cuDNN + compile, gate/up as two GEMMs": (
        lambda s: gate_up_apart(nanovision_model(s, "sdpa", "llama", True)), SDPBackend.CUDNN_ATTENTION, True),
    "+ fused kernels + cuDNN + compile, rotary after the q/k/v split": (
        lambda s: rotary_after_split(nanovision_model(s, "sdpa", "llama", True)), SDPBackend.CUDNN_ATTENTION, True),
    "+ cuDNN + compile (no fused kernels)": (lambda s: nanovision_model(s, "sdpa", "llama", False),
                                             SDPBackend.CUDNN_ATTENTION, True),
    "nanovision nanochat-block, fused + cuDNN": (lambda s: nanovision_model(s, "sdpa", "nanochat", True),
                                                 SDPBackend.CUDNN_ATTENTION, False),
    "nanovision nanochat-block, three q/k/v GEMMs": (
        lambda s: separate_qkv(nanovision_model(s, "sdpa", "nanochat", True)), SDPBackend.CUDNN_ATTENTION, False),
    "nanovision nanochat-block, best": (lambda s: nanovision_model(s, "sdpa", "nanochat", True),
                                        SDPBackend.CUDNN_ATTENTION, True),
}


def matmul_tflops(device):
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(20):
        a @ b
    torch.cuda.synchronize()
    return 2 * 8192**3 * 20 / (time.perf_counter() - start) / 1e12


def cuda_ms(fn, repeats=5, warmup=2, calls=1):
    """Median GPU milliseconds of one fn() call, between CUDA events around `calls` calls queued back to back. Time
    a kernel of ~0.2 ms with calls > 1: timed alone it would include the host's launch time, as the GPU waits for it."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / calls)
    return statistics.median(times)


def make_batch(s, device, packed_lengths=None, generator=None):
    ids = torch.randint(0, s["vocab"], (s["batch"], s["seq"]), device=device, generator=generator)
    labels = ids.clone()
    if packed_lengths is None:
        return dict(input_ids=ids, labels=labels), s["batch"] * s["seq"]
    position_ids = torch.empty_like(ids)
    useful = 0
    for row, lengths in enumerate(packed_lengths):
        positions = torch.cat([torch.arange(n) for n in lengths] + [torch.arange(s["seq"] - sum(lengths))])
        position_ids[row] = positions.to(device)
        starts = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
        labels[row, starts[starts < s["seq"]]] = -100
        labels[row, sum(lengths):] = -100
        useful += sum(lengths)
    cu_seqlens, longest = document_bounds(position_ids)
    return dict(input_ids=ids, labels=labels, position_ids=position_ids, cu_seq_lens_q=cu_seqlens,
                cu_seq_lens_k=cu_seqlens, max_length_q=longest, max_length_k=longest), useful


def lognormal_rows(s, mean=600, sigma=0.8, seed=0):
    """Documents with log-normal lengths (mean ~600, capped at seq), best-fit packed into rows of seq tokens; a
    seeded random sample of those rows (the first rows of a best-fit packing hold the longest documents alone)."""
    from nanovision.training.bin_packing import pack_examples

    g = torch.Generator().manual_seed(seed)
    mu = math.log(mean) - sigma**2 / 2
    lengths = torch.exp(torch.randn(4000, generator=g) * sigma + mu).clamp(16, s["seq"]).long().tolist()
    rows = pack_examples(lengths, s["seq"])
    picked = torch.randperm(len(rows), generator=g)[: s["batch"]].tolist()
    return [[lengths[i] for i in rows[r]] for r in picked]


def kernel_profile(step, steps, top=30):
    """GPU kernel time a step under torch.profiler: the total and the `top` kernels by time (ms and launches a step)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    kernels = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    kernels.sort(key=lambda e: e.device_time_total, reverse=True)
    return dict(kernel_ms=sum(e.device_time_total for e in kernels) / 1e3 / steps,
                launches=sum(e.count for e in kernels) / steps,
                top=[dict(kernel=e.key[:120], ms=e.device_time_total / 1e3 / steps, launches=e.count / steps)
                     for e in kernels[:top]])


def time_steps(model, batch, attention_backend, steps, warmup, profile_steps=0):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

    def step():
        torch.compiler.cudagraph_mark_step_begin()  # CUDA-graph replays (mode="reduce-overhead") start a new step here
        backend = sdpa_kernel(attention_backend) if attention_backend is not None else contextlib.nullcontext()
        with backend, torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        loss = step()
    torch.cuda.synchronize()
    elapsed = (time.perf_counter() - start) / steps
    peak_gib = torch.cuda.max_memory_allocated() / 2**30
    return elapsed, peak_gib, float(loss), (kernel_profile(step, profile_steps) if profile_steps else None)


def bench_variant(name, s, device, peak, batch, useful_tokens, steps, warmup, profile_steps=0):
    build, backend, compiled = VARIANTS[name]
    torch.manual_seed(0)
    model = build(s).to(device).train()
    fpt = flops_per_token(model, s["seq"])
    runner = torch.compile(model, **(compiled if isinstance(compiled, dict) else {})) if compiled else model
    seconds, peak_gib, loss, kernels = time_steps(runner, batch, backend, steps, warmup, profile_steps)
    tokens_per_s = useful_tokens / seconds
    row = dict(variant=name, step_ms=seconds * 1e3, tokens_per_s=tokens_per_s, tflops=tokens_per_s * fpt / 1e12,
               mfu=tokens_per_s * fpt / 1e12 / peak, peak_gib=peak_gib, loss=loss)
    if kernels:
        row["profile"] = kernels
    del model, runner
    gc.collect()
    torch.cuda.empty_cache()
    torch._dynamo.reset()
    return row


def torch_varlen(q, k, v, cu_seqlens, longest):
    """torch.nn.attention.varlen (FlashAttention-2 inside PyTorch), causal; kv heads repeated where it has no GQA."""
    import inspect

    from torch.nn.attention.varlen import varlen_attn

    params = inspect.signature(varlen_attn).parameters
    causal = {"is_causal": True} if "is_causal" in params else {"window_size": (-1, 0)}
    if "enable_gqa" in params:
        return varlen_attn(q, k, v, cu_seqlens, cu_seqlens, longest, longest, enable_gqa=True, **causal)
    group = q.shape[1] // k.shape[1]
    return varlen_attn(q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1), cu_seqlens, cu_seqlens,
                       longest, longest, **causal)


def attention_only(s, device, rows, cu_seqlens, longest):
    """Packed attention forward+backward, TFLOP/s counting only in-document causal work, against dense cuDNN."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    B, T, H, Hk, D = s["batch"], s["seq"], s["heads"], s["kv_heads"], s["head_dim"]
    q = torch.randn(B, H, T, D, device=device, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(B, Hk, T, D, device=device, dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(B, Hk, T, D, device=device, dtype=torch.bfloat16, requires_grad=True)
    doc = torch.full((B, T), -1, device=device, dtype=torch.long)
    for row, lengths in enumerate(rows):
        doc[row, : sum(lengths)] = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths)).to(device)
    in_doc_pairs = sum(n * (n + 1) / 2 for lengths in rows for n in lengths)
    dense_pairs = B * T * (T + 1) / 2
    # varlen kernels take token-major [B * T, H, D] tensors, the layout the q/k/v projections produce
    q_rows, k_rows, v_rows = (t.detach().transpose(1, 2).reshape(B * T, t.shape[1], D).requires_grad_()
                              for t in (q, k, v))
    flops = lambda pairs: 4 * D * H * pairs * 3.5  # noqa: E731  fwd (2 matmuls) + bwd (2.5x fwd)

    def doc_mask(b, h, qi, ki):
        return (doc[b, qi] == doc[b, ki]) & (qi >= ki) & (doc[b, qi] >= 0)

    block_mask = create_block_mask(doc_mask, B, None, T, T, device=device)
    flex = torch.compile(flex_attention)
    dense_bool = (doc[:, :, None] == doc[:, None, :]) & torch.ones(T, T, device=device, dtype=torch.bool).tril()
    dense_bool |= torch.eye(T, device=device, dtype=torch.bool)  # padding rows attend to themselves
    cases = {
        "dense causal, cuDNN": (lambda: torch.nn.functional.scaled_dot_product_attention(
            q, k, v, is_causal=True, enable_gqa=True), SDPBackend.CUDNN_ATTENTION, dense_pairs),
        "packed, flex_attention document mask": (lambda: flex(q, k, v, block_mask=block_mask, enable_gqa=True),
                                                 None, in_doc_pairs),
        "packed, sdpa block-diagonal mask (efficient)": (lambda: torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=dense_bool[:, None], enable_gqa=True), SDPBackend.EFFICIENT_ATTENTION, in_doc_pairs),
        "packed, nanovision varlen (Triton)": (lambda: nanovision.kernels.varlen_attention(
            q_rows, k_rows, v_rows, cu_seqlens, longest), None, in_doc_pairs),
        "packed, torch varlen_attn (flash)": (lambda: torch_varlen(q_rows, k_rows, v_rows, cu_seqlens, longest),
                                              None, in_doc_pairs),
    }
    out = []
    for name, (fn, backend, pairs) in cases.items():
        context = sdpa_kernel(backend) if backend is not None else contextlib.nullcontext()
        try:
            with context:
                for _ in range(3):
                    fn().sum().backward()
                torch.cuda.synchronize()
                start = time.perf_counter()
                for _ in range(10):
                    fn().sum().backward()
                torch.cuda.synchronize()
            ms = (time.perf_counter() - start) / 10 * 1e3
            out.append(dict(case=name, ms=ms, useful_tflops=flops(pairs) / ms / 1e9))
        except Exception as error:  # a backend that refuses this input is reported, not fatal
            out.append(dict(case=name, error=repr(error)[:200]))
    return out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "train_step.json"))
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS))
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--packed", nargs="*", default=["flex_attention", "sdpa", "nanovision_varlen"],
                        help="attention implementations for the packed-training rows")
    parser.add_argument("--smoke", action="store_true", help="tiny shape, for a quick check")
    parser.add_argument("--profile", type=int, default=0, metavar="STEPS",
                        help="after the timed steps, profile this many more and record each variant's kernel times")
    args = parser.parse_args()
    s = SMOKE if args.smoke else SHAPE
    device = torch.device("cuda")
    peak = matmul_tflops(device)
    print(f"# {torch.cuda.get_device_name()} torch {torch.__version__}; bf16 matmul 8192^3: {peak:.0f} TFLOP/s; "
          f"{describe_backends()}")
    full, full_tokens = make_batch(s, device)
    rows = []
    for name in args.variants:
        rows.append(bench_variant(name, s, device, peak, full, full_tokens, args.steps, args.warmup, args.profile))
        print(f"{name:42s} {rows[-1]['step_ms']:8.1f} ms {rows[-1]['tokens_per_s']:10.0f} tok/s "
              f"{rows[-1]['tflops']:6.0f} TFLOP/s MFU {rows[-1]['mfu']:.3f} peak {rows[-1]['peak_gib']:.1f} GiB")
        if "profile" in rows[-1]:
            p = rows[-1]["profile"]
            print(f"  kernels {p['kernel_ms']:.1f} ms a step, {p['launches']:.0f} launches; "
                  + "; ".join(f"{k['kernel'][:40]} {k['ms']:.2f}" for k in p["top"][:12]))
    packed_rows = lognormal_rows(s)
    packed, useful = make_batch(s, device, packed_rows)
    packed_result = []
    for attn in args.packed:
        name = f"nanovision best, packed ({attn})"
        VARIANTS[name] = (lambda s, attn=attn: nanovision_model(s, attn, "llama", True), None, True)
        packed_result.append(bench_variant(name, s, device, peak, packed, useful, args.steps, args.warmup))
        print(f"{name:42s} {packed_result[-1]['tokens_per_s']:10.0f} useful tok/s "
              f"({useful / (s['batch'] * s['seq']):.1%} of the row tokens are real)")
    attention = attention_only(s, device, packed_rows, packed["cu_seq_lens_q"], packed["max_length_q"])
    for row in attention:
        print(f"attention: {row['case']:46s} " + (f"{row['ms']:.2f} ms {row['useful_tflops']:.0f} useful TFLOP/s"
                                                  if "ms" in row else row["error"]))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                                              matmul_tflops=peak, shape=s, kernels=describe_backends(),
                                              variants=rows, packed=packed_result, attention=attention), indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
