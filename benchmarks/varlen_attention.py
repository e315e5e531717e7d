"""Packed (varlen) attention on one GPU: nanovision's Triton kernels against dense causal cuDNN attention over the same
rows, in one run, the other packed kernels at hand (torch's varlen_attn and, where `flash-attn-4` or `flash-attn` (2)
is installed, its varlen function, each checked against nanovision's output and gradients), and with --sweep a sweep
of the Triton kernels' launch configs (tile sizes, warps, pipeline stages).

Shape: the d20 attention (10 query heads, 5 KV heads, head dim 128, bf16), 8 rows of 2048 tokens best-fit packed with
log-normal documents (mean ~600), as in benchmarks/train_step.py, and the same rows as one document each. Figures are
useful TFLOP/s: only in-document causal pairs count (fwd 2 matmuls, bwd 2.5x fwd), dense attention counting its whole
causal triangle.

    python benchmarks/varlen_attention.py --out benchmarks/results/varlen_attention.json [--sweep [--quick]]
"""

import argparse
import functools
import importlib
import json
import time
from itertools import product
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from train_step import SHAPE, cuda_ms, lognormal_rows, torch_varlen  # benchmarks/ is the script's directory

from nanovision.kernels import document_bounds
from nanovision.kernels.ops import varlen_attention as ops


def candidates(quick):
    """(forward, dK/dV, dQ) configs (BLOCK_M query rows of a tile, BLOCK_N, num_warps, num_stages). With the d20's kv
    groups of two a tile of BLOCK_M rows holds BLOCK_M / 2 positions of two heads; the forward and dQ shrink BLOCK_N
    to those positions, the dK/dV kernel wants its BLOCK_N a multiple of them."""
    warps, stages = ((4, 8), (2, 3)) if quick else ((4, 8), (2, 3, 4))
    fwd = [(m, n, w, st) for (m, n), w, st in product([(64, 32), (128, 32), (128, 64), (256, 64), (256, 128)],
                                                       warps, stages)]
    dkdv = [(m, n, w, st) for (m, n), w, st in product([(16, 64), (32, 64), (64, 64), (32, 128), (64, 128), (128, 128)],
                                                        warps, (1, 2, 3))]
    dq = [(m, n, w, st) for (m, n), w, st in product([(64, 32), (128, 32), (128, 64), (256, 64)], warps, stages)]
    return fwd, dkdv, dq


def queued_ms(fn):
    """Median GPU milliseconds of one call among 10 queued back to back, as a training step queues them."""
    return cuda_ms(fn, repeats=10, warmup=3, calls=10)


def measure(rows, sweep_configs, quick):
    """The table for one layout of documents in the rows; returns its JSON."""
    s, device = SHAPE, torch.device("cuda")
    B, T, H, Hk, D = s["batch"], s["seq"], s["heads"], s["kv_heads"], s["head_dim"]
    position_ids = torch.cat([torch.cat([torch.arange(n) for n in lengths] + [torch.arange(T - sum(lengths))])[None]
                              for lengths in rows]).to(device)
    cu_seqlens, longest = document_bounds(position_ids)
    in_doc_pairs = sum(n * (n + 1) / 2 for lengths in rows for n in lengths)
    dense_pairs = B * T * (T + 1) / 2
    fwd_tflops = lambda pairs, ms: 4 * D * H * pairs / ms / 1e9  # noqa: E731
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(B * T, H, D, device=device, dtype=torch.bfloat16, generator=g)
    k = torch.randn(B * T, Hk, D, device=device, dtype=torch.bfloat16, generator=g)
    v = torch.randn(B * T, Hk, D, device=device, dtype=torch.bfloat16, generator=g)
    do = torch.randn_like(q)
    scale = D ** -0.5
    print(f"# {torch.cuda.get_device_name()} torch {torch.__version__}; {len(cu_seqlens) - 1} documents, longest "
          f"{longest}, {in_doc_pairs / dense_pairs:.1%} of the dense causal pairs")

    # dense causal cuDNN over whole rows: [B, H, T, D] views of the same tensors
    qd, kd, vd = (t.view(B, T, -1, D).transpose(1, 2).detach().requires_grad_() for t in (q, k, v))
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        dense_out = F.scaled_dot_product_attention(qd, kd, vd, is_causal=True, enable_gqa=True)
        dense_fwd = queued_ms(lambda: F.scaled_dot_product_attention(qd, kd, vd, is_causal=True, enable_gqa=True))
        dense_do = do.view(B, T, H, D).transpose(1, 2)
        dense_bwd = queued_ms(lambda: torch.autograd.grad(dense_out, (qd, kd, vd), dense_do, retain_graph=True))
    dense = dict(fwd_ms=dense_fwd, bwd_ms=dense_bwd, fwd_tflops=fwd_tflops(dense_pairs, dense_fwd),
                 bwd_tflops=2.5 * fwd_tflops(dense_pairs, dense_bwd),
                 total_tflops=3.5 * fwd_tflops(dense_pairs, dense_fwd + dense_bwd))
    print(f"dense causal cuDNN: fwd {dense_fwd:.3f} ms ({dense['fwd_tflops']:.0f} TFLOP/s), bwd {dense_bwd:.3f} ms "
          f"({dense['bwd_tflops']:.0f}), fwd+bwd {dense['total_tflops']:.0f} useful TFLOP/s")

    defaults = dict(FWD_CONFIG=ops.FWD_CONFIG, BWD_DKDV_CONFIG=ops.BWD_DKDV_CONFIG, BWD_DQ_CONFIG=ops.BWD_DQ_CONFIG,
                    MIN_POSITIONS=ops.MIN_POSITIONS)

    def use_configs(**settings):
        for name, value in {**defaults, **settings}.items():
            setattr(ops, name, value)

    def timed(**settings):
        use_configs(**settings)
        try:
            out, lse = ops._forward(q, k, v, cu_seqlens, longest, scale)
            fwd = queued_ms(lambda: ops._forward(q, k, v, cu_seqlens, longest, scale))
            bwd = queued_ms(lambda: ops._backward(do, q, k, v, out, lse, cu_seqlens, longest, scale))
            return fwd, bwd
        except Exception as error:  # noqa: BLE001  a config that does not fit (shared memory, registers) is skipped
            return repr(error)[:120]

    # the ablation: no tile packs the heads of a kv group (each holds one head's positions, as before 2026-12-02)
    sweep, schemes = [], {"defaults": {}, "defaults, one head a tile": dict(MIN_POSITIONS=1 << 30)}
    if sweep_configs:
        fwd_c, dkdv_c, dq_c = candidates(quick)
        start = time.perf_counter()

        def best(kernel):
            return min((r for r in sweep if r["kernel"] == kernel and "ms" in r), key=lambda r: r["ms"])["config"]

        for kernel, configs, settings, part in (
                ("forward", fwd_c, lambda c: dict(FWD_CONFIG=c), 0),
                ("dkdv", dkdv_c, lambda c: dict(FWD_CONFIG=best("forward"), BWD_DKDV_CONFIG=c), 1),
                ("dq", dq_c, lambda c: dict(FWD_CONFIG=best("forward"), BWD_DKDV_CONFIG=best("dkdv"),
                                            BWD_DQ_CONFIG=c), 1)):
            for config in configs:
                r = timed(**settings(config))
                sweep.append(dict(kernel=kernel, config=config,
                                  **(dict(ms=r[part]) if isinstance(r, tuple) else dict(error=r))))
        print(f"sweep: {len(sweep)} configs in {time.perf_counter() - start:.0f} s")
        schemes["best of the sweep"] = dict(FWD_CONFIG=best("forward"), BWD_DKDV_CONFIG=best("dkdv"),
                                            BWD_DQ_CONFIG=best("dq"))

    results = []
    print(f"\n{'scheme':36} {'fwd ms':>7} {'bwd ms':>7} {'fwd TF':>7} {'bwd TF':>7} {'total TF':>8} {'x dense':>7} "
          f"{'error':>8}")
    print(f"{'dense causal cuDNN':36} {dense_fwd:7.3f} {dense_bwd:7.3f} {dense['fwd_tflops']:7.0f} "
          f"{dense['bwd_tflops']:7.0f} {dense['total_tflops']:8.0f} {1.0:7.2f}")

    def record(name, fwd, bwd, **extra):
        total = 3.5 * fwd_tflops(in_doc_pairs, fwd + bwd)
        results.append(dict(scheme=name, fwd_ms=fwd, bwd_ms=bwd, fwd_tflops=fwd_tflops(in_doc_pairs, fwd),
                            bwd_tflops=2.5 * fwd_tflops(in_doc_pairs, bwd), total_tflops=total,
                            vs_dense=total / dense["total_tflops"], **extra))
        r = results[-1]
        error = f"{r['max_rel_error']:8.1e}" if "max_rel_error" in r else ""
        print(f"{name:36} {fwd:7.3f} {bwd:7.3f} {r['fwd_tflops']:7.0f} {r['bwd_tflops']:7.0f} {total:8.0f} "
              f"{r['vs_dense']:7.2f} {error}")

    for name, settings in schemes.items():
        fwd, bwd = timed(**settings)
        record(f"nanovision Triton, {name}", fwd, bwd,
               settings={k: list(v) if isinstance(v, tuple) else v for k, v in settings.items()})
    use_configs()
    # the Triton kernels' output and input gradients for do are what the other kernels are checked against
    reference_out, reference_lse = ops._forward(q, k, v, cu_seqlens, longest, scale)
    reference_grads = ops._backward(do, q, k, v, reference_out, reference_lse, cu_seqlens, longest, scale)

    def rel_error(got, want):
        return float((got.detach().float() - want.float()).norm() / want.float().norm())

    # other packed-attention kernels over the same tokens, through autograd (forward, then backward of that output)
    others = {"torch varlen_attn (flash)": lambda q, k, v: torch_varlen(q, k, v, cu_seqlens, longest)}
    # flash-attn-4 installs flash_attn.cute; flash-attn (2) the top-level flash_attn
    for name, module in (("flash-attn-4 varlen", "flash_attn.cute"), ("flash-attn-2 varlen", "flash_attn")):
        try:
            varlen_func = importlib.import_module(module).flash_attn_varlen_func
        except (ImportError, AttributeError):
            print(f"{module}.flash_attn_varlen_func is not installed: the {name} row is left out")
            continue
        others[name] = functools.partial(varlen_func, cu_seqlens_q=cu_seqlens, cu_seqlens_k=cu_seqlens,
                                         max_seqlen_q=longest, max_seqlen_k=longest, causal=True)
    for name, fn in others.items():
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        call = lambda: (lambda out: out[0] if isinstance(out, tuple) else out)(fn(*leaves))  # noqa: E731
        try:
            out = call()
            grads = torch.autograd.grad(out, leaves, do, retain_graph=True)
            error = max(rel_error(got, want) for got, want in zip((out, *grads), (reference_out, *reference_grads)))
            fwd = queued_ms(call)
            bwd = queued_ms(lambda: torch.autograd.grad(out, leaves, do, retain_graph=True))
        except Exception as error:  # noqa: BLE001  a kernel that refuses this input is reported
            results.append(dict(scheme=name, error=repr(error)[:300]))
            print(f"{name:36} failed: {results[-1]['error']}")
            continue
        record(name, fwd, bwd, max_rel_error=error)
    for kernel in ("forward", "dkdv", "dq") if sweep else ():
        ranked = sorted((r for r in sweep if r["kernel"] == kernel and "ms" in r), key=lambda r: r["ms"])
        print(f"{kernel}: " + "; ".join(f"{tuple(r['config'])} {r['ms']:.3f}" for r in ranked[:5]))
    return dict(documents=len(cu_seqlens) - 1, longest=longest, in_document_share=in_doc_pairs / dense_pairs,
                dense=dense, schemes=results, sweep=sweep)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "varlen_attention.json"))
    parser.add_argument("--sweep", action="store_true",
                        help="also sweep the Triton kernels' launch configs (on the packed layout)")
    parser.add_argument("--quick", action="store_true", help="fewer warps/stages candidates in the sweep")
    args = parser.parse_args()
    s = SHAPE
    # the packed rows of training, and whole rows as one document each: the same work as dense attention, so the
    # second layout measures the kernels alone, without the short documents' diagonal and tail blocks
    layouts = {"log-normal documents (mean ~600)": (lognormal_rows(s), args.sweep),
               "one document a row": ([[s["seq"]]] * s["batch"], False)}
    results = {name: measure(rows, sweep, args.quick) for name, (rows, sweep) in layouts.items()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                                              triton=__import__("triton").__version__, layouts=results), indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
