"""Causal variable-length ("varlen") attention with grouped-query heads: Triton FlashAttention-2.

Packed training concatenates several documents in one row; a token may attend only to itself and the earlier
tokens of its own document. Dense attention over the row would compute (and mask away) every cross-document
pair, so these kernels walk each document's causal triangle alone, described by cumulative boundaries:

    q [total_tokens, Hq, D], k / v [total_tokens, Hkv, D], cu_seqlens int32 [num_seqs + 1]
    document i = tokens cu_seqlens[i] : cu_seqlens[i + 1]; query head h reads kv head h // (Hq // Hkv)

Forward: one program per (query block, document, query heads), online softmax in fp32 with exp2, saving the
row log-sum-exp. Backward recomputes the probabilities from q, k and that log-sum-exp: delta = rowsum(dO * O),
then dK/dV with one program per (key block, document, kv head) that loops over the query heads of its group (so
every dk / dv row has a single writer: no atomics), then dQ with one program per (query block, document, query
heads). Only the blocks that straddle the diagonal or the document's end pay for masking. Each grid puts the
block's position on its slow axis and (document, heads) on its fast one, so the heaviest blocks of all documents
launch before the light ones instead of one document after another.

Query tiles hold PACK heads of one kv group at once (rows = PACK heads x POS positions, head-major), as
FlashAttention-3's packed GQA does: each k / v tile loaded serves every head of the tile, and a tile covers
fewer positions, so a short document's diagonal and tail tiles mask less.
"""

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl

    from torch.library import triton_op

    from .launch import with_unit_last_stride, wrap_triton, written_buffer

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised on machines without triton
    HAS_TRITON = False


# --------------------------------------------------------------------------- #
# Reference
# --------------------------------------------------------------------------- #
def varlen_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    scale: Optional[float] = None,
) -> torch.Tensor:
    """Per-document causal SDPA with repeated kv heads, in fp32 (fp64 for fp64 inputs), returned in q's dtype.

    Documents of similar length (the same power-of-two length class) run as one SDPA batch, each padded at its end
    to the longest of its class: causality hides that padding from the document's own tokens, and the padded
    positions' outputs are dropped, so every document still attends to itself alone. A Python loop per document
    costs more than the attention on a CPU, and dense attention over whole packed rows computes every
    cross-document pair. `max_seqlen` is unused; it keeps the signature of `varlen_attention`.
    """
    compute_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    group = q.shape[1] // k.shape[1]
    cu_seqlens = cu_seqlens.to(q.device, torch.long)
    starts, lengths = cu_seqlens[:-1], cu_seqlens[1:] - cu_seqlens[:-1]
    length_class = torch.log2(lengths.clamp(min=1).double()).ceil().long()
    outs, token_ids = [], []
    for cls in length_class[lengths > 0].unique().tolist():
        docs = ((length_class == cls) & (lengths > 0)).nonzero()[:, 0]
        offsets = torch.arange(int(lengths[docs].max()), device=q.device)
        inside = offsets < lengths[docs, None]  # [docs, longest]
        # padded positions read their document's first token: any finite value works, causality hides them
        index = starts[docs, None] + torch.where(inside, offsets, 0)

        def batch(x, repeats=1):
            x = x[index].to(compute_dtype).transpose(1, 2)  # [docs, heads, longest, D]
            return x.repeat_interleave(repeats, 1) if repeats > 1 else x

        out = F.scaled_dot_product_attention(batch(q), batch(k, group), batch(v, group), is_causal=True, scale=scale)
        outs.append(out.transpose(1, 2)[inside])
        token_ids.append(index[inside])
    return torch.cat(outs)[torch.cat(token_ids).argsort()].to(q.dtype)


# --------------------------------------------------------------------------- #
# Kernels
# --------------------------------------------------------------------------- #
# Positions (offs_m, offs_n, start_*) are relative to the document's first token; the pointers passed around already
# point at that token and head. Scores live in the log2 domain: qk_scale = scale * log2(e) and the saved LSE is
# log2(sum(exp2(qk * qk_scale))), so every exponential is one exp2.
if HAS_TRITON:

    @triton.jit
    def _fwd_inner(
        acc, l_i, m_i, q,
        K, V, stride_kt, stride_vt,
        offs_m, seq_len, qk_scale, lo, hi,
        HEAD_DIM: tl.constexpr,
        BLOCK_N: tl.constexpr,
        MASK: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM)
        k_ptrs = K + offs_n[:, None] * stride_kt + offs_d[None, :]
        v_ptrs = V + offs_n[:, None] * stride_vt + offs_d[None, :]
        for start_n in range(lo, hi, BLOCK_N):
            cols = start_n + offs_n
            if MASK:
                # keys past the document's end belong to the next document (or past the tensor)
                k = tl.load(k_ptrs + start_n * stride_kt, mask=(cols < seq_len)[:, None], other=0.0)
            else:
                k = tl.load(k_ptrs + start_n * stride_kt)
            qk = tl.dot(q, tl.trans(k), input_precision=PRECISION)
            if MASK:
                # causal mask (it also hides keys past the document's end from every row inside it); each row keeps
                # at least one key of the first masked block, so m_new stays finite
                qk = tl.where(offs_m[:, None] >= cols[None, :], qk * qk_scale, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(qk, 1))
                qk = qk - m_new[:, None]
            else:
                # the scale is positive, so it commutes with max; applying it in the subtraction costs one FMA
                m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
                qk = qk * qk_scale - m_new[:, None]
            p = tl.math.exp2(qk)
            alpha = tl.math.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            if MASK:
                v = tl.load(v_ptrs + start_n * stride_vt, mask=(cols < seq_len)[:, None], other=0.0)
            else:
                v = tl.load(v_ptrs + start_n * stride_vt)
            acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
            m_i = m_new
        return acc, l_i, m_i

    @triton.jit
    def _varlen_fwd_kernel(
        Q, K, V, OUT, LSE, CU_SEQLENS,
        qk_scale,
        stride_qt, stride_qh,
        stride_kt, stride_kh,
        stride_vt, stride_vh,
        stride_ot, stride_oh,
        stride_lse_h,
        GROUP: tl.constexpr,
        PACK: tl.constexpr,
        HEAD_TILES: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        POS: tl.constexpr = BLOCK_M // PACK
        # the diagonal blocks start exactly at the query block's first position
        tl.static_assert(POS % BLOCK_N == 0)
        # inside a compiled graph the scale can arrive as an fp64 scalar (a symbolic float), which would promote every
        # score to fp64
        qk_scale = tl.cast(qk_scale, tl.float32)
        # causal work grows with the query position: the grid's slow axis counts query blocks down from the longest
        # document's last, so every document's heaviest blocks launch first and the light ones fill the grid's tail
        start_m = (tl.num_programs(1) - 1 - tl.program_id(1)) * POS
        seq = tl.program_id(0) // HEAD_TILES
        head0 = tl.program_id(0) % HEAD_TILES * PACK
        seq_start = tl.load(CU_SEQLENS + seq)
        seq_len = tl.load(CU_SEQLENS + seq + 1) - seq_start
        if start_m >= seq_len:
            return
        kv_head = head0 // GROUP
        tok0 = seq_start.to(tl.int64)
        Q += tok0 * stride_qt + head0 * stride_qh
        K += tok0 * stride_kt + kv_head * stride_kh
        V += tok0 * stride_vt + kv_head * stride_vh
        OUT += tok0 * stride_ot + head0 * stride_oh
        LSE += head0.to(tl.int64) * stride_lse_h + tok0

        rows = tl.arange(0, BLOCK_M)
        offs_m = start_m + rows % POS
        row_head = rows // POS
        offs_d = tl.arange(0, HEAD_DIM)
        row_mask = offs_m < seq_len
        q_ptrs = Q + offs_m[:, None] * stride_qt + row_head[:, None] * stride_qh + offs_d[None, :]
        q = tl.load(q_ptrs, mask=row_mask[:, None], other=0.0)

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        # keys before the query block are visible to all its rows and inside the document: no mask
        acc, l_i, m_i = _fwd_inner(
            acc, l_i, m_i, q, K, V, stride_kt, stride_vt, offs_m, seq_len, qk_scale, 0, start_m,
            HEAD_DIM, BLOCK_N, False, PRECISION,
        )
        acc, l_i, m_i = _fwd_inner(
            acc, l_i, m_i, q, K, V, stride_kt, stride_vt, offs_m, seq_len, qk_scale,
            start_m, tl.minimum(start_m + POS, seq_len),
            HEAD_DIM, BLOCK_N, True, PRECISION,
        )
        acc = acc / l_i[:, None]
        tl.store(LSE + row_head * stride_lse_h + offs_m, m_i + tl.math.log2(l_i), mask=row_mask)
        out_ptrs = OUT + offs_m[:, None] * stride_ot + row_head[:, None] * stride_oh + offs_d[None, :]
        tl.store(out_ptrs, acc.to(OUT.dtype.element_ty), mask=row_mask[:, None])

    @triton.jit
    def _varlen_bwd_preprocess_kernel(
        OUT, DO, DELTA,
        stride_ot, stride_oh,
        stride_dot, stride_doh,
        stride_delta_h,
        total_tokens,
        HEAD_DIM: tl.constexpr,
        BLOCK_M: tl.constexpr,
    ):
        offs_t = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        head = tl.program_id(1).to(tl.int64)
        offs_d = tl.arange(0, HEAD_DIM)
        mask = (offs_t < total_tokens)[:, None]
        offs_t64 = offs_t.to(tl.int64)
        o = tl.load(OUT + head * stride_oh + offs_t64[:, None] * stride_ot + offs_d[None, :], mask=mask, other=0.0)
        do = tl.load(DO + head * stride_doh + offs_t64[:, None] * stride_dot + offs_d[None, :], mask=mask, other=0.0)
        delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
        tl.store(DELTA + head * stride_delta_h + offs_t, delta, mask=offs_t < total_tokens)

    @triton.jit
    def _bwd_dkdv_inner(
        dk, dv, k, v,
        Q, DO, LSE, DELTA, stride_qt, stride_qh, stride_dot, stride_doh, stride_lse_h,
        offs_n, seq_len, qk_scale, lo, hi,
        HEAD_DIM: tl.constexpr,
        BLOCK_M: tl.constexpr,
        POS: tl.constexpr,
        MASK: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        # works on transposed scores S^T [BLOCK_N, BLOCK_M] so that P^T and dS^T feed the dk / dv products
        # directly (no register transpose of P); the BLOCK_M columns are PACK heads x POS positions, so the products
        # also sum over the tile's heads, as dk / dv of a shared kv head must
        cols = tl.arange(0, BLOCK_M)
        offs_m = cols % POS
        col_head = cols // POS
        offs_d = tl.arange(0, HEAD_DIM)
        qT_ptrs = Q + offs_m[None, :] * stride_qt + col_head[None, :] * stride_qh + offs_d[:, None]
        do_ptrs = DO + offs_m[:, None] * stride_dot + col_head[:, None] * stride_doh + offs_d[None, :]
        lse_ptrs = LSE + col_head * stride_lse_h + offs_m
        delta_ptrs = DELTA + col_head * stride_lse_h + offs_m
        for start_m in range(lo, hi, POS):
            rows = start_m + offs_m
            if MASK:
                row_in = rows < seq_len
                qT = tl.load(qT_ptrs + start_m * stride_qt, mask=row_in[None, :], other=0.0)
                lse = tl.load(lse_ptrs + start_m, mask=row_in, other=0.0)
            else:
                qT = tl.load(qT_ptrs + start_m * stride_qt)
                lse = tl.load(lse_ptrs + start_m)
            pT = tl.math.exp2(tl.dot(k, qT, input_precision=PRECISION) * qk_scale - lse[None, :])
            if MASK:
                # above the diagonal the recomputed exponent may overflow; where() drops it before any use
                pT = tl.where((rows[None, :] >= offs_n[:, None]) & row_in[None, :], pT, 0.0)
                do = tl.load(do_ptrs + start_m * stride_dot, mask=row_in[:, None], other=0.0)
                delta = tl.load(delta_ptrs + start_m, mask=row_in, other=0.0)
            else:
                do = tl.load(do_ptrs + start_m * stride_dot)
                delta = tl.load(delta_ptrs + start_m)
            dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=PRECISION)
            dpT = tl.dot(v, tl.trans(do), input_precision=PRECISION)
            dsT = pT * (dpT - delta[None, :])
            dk = tl.dot(dsT.to(qT.dtype), tl.trans(qT), dk, input_precision=PRECISION)
        return dk, dv

    @triton.jit
    def _varlen_bwd_dkdv_kernel(
        Q, K, V, DO, LSE, DELTA, DK, DV, CU_SEQLENS,
        sm_scale, qk_scale,
        stride_qt, stride_qh,
        stride_kt, stride_kh,
        stride_vt, stride_vh,
        stride_dot, stride_doh,
        stride_dkt, stride_dkh,
        stride_dvt, stride_dvh,
        stride_lse_h,
        GROUP: tl.constexpr,
        PACK: tl.constexpr,
        N_KV_HEADS: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        POS: tl.constexpr = BLOCK_M // PACK
        # the query blocks that straddle the diagonal are exactly those covering [start_n, start_n + BLOCK_N)
        tl.static_assert(BLOCK_N % POS == 0)
        sm_scale, qk_scale = tl.cast(sm_scale, tl.float32), tl.cast(qk_scale, tl.float32)  # as in the forward
        # a key block's work shrinks with its position: the grid's slow axis counts key blocks up, so every
        # document's heaviest (first) blocks launch first
        start_n = tl.program_id(1) * BLOCK_N
        seq = tl.program_id(0) // N_KV_HEADS
        kv_head = tl.program_id(0) % N_KV_HEADS
        seq_start = tl.load(CU_SEQLENS + seq)
        seq_len = tl.load(CU_SEQLENS + seq + 1) - seq_start
        if start_n >= seq_len:
            return
        tok0 = seq_start.to(tl.int64)
        K += tok0 * stride_kt + kv_head * stride_kh
        V += tok0 * stride_vt + kv_head * stride_vh
        DK += tok0 * stride_dkt + kv_head * stride_dkh
        DV += tok0 * stride_dvt + kv_head * stride_dvh

        offs_n = start_n + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM)
        col_mask = (offs_n < seq_len)[:, None]
        k = tl.load(K + offs_n[:, None] * stride_kt + offs_d[None, :], mask=col_mask, other=0.0)
        v = tl.load(V + offs_n[:, None] * stride_vt + offs_d[None, :], mask=col_mask, other=0.0)
        dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)

        diag_end = tl.minimum(start_n + BLOCK_N, seq_len)
        # query blocks below the diagonal that lie wholly inside the document need no mask; the one partial block
        # at the document's end (if past the diagonal) takes the masked path
        full_end = seq_len // POS * POS
        tail_start = tl.maximum(start_n + BLOCK_N, full_end)
        for g in range(GROUP // PACK):
            head = kv_head * GROUP + g * PACK
            q_head = Q + tok0 * stride_qt + head * stride_qh
            do_head = DO + tok0 * stride_dot + head * stride_doh
            lse_head = LSE + head.to(tl.int64) * stride_lse_h + tok0
            delta_head = DELTA + head.to(tl.int64) * stride_lse_h + tok0
            dk, dv = _bwd_dkdv_inner(
                dk, dv, k, v, q_head, do_head, lse_head, delta_head,
                stride_qt, stride_qh, stride_dot, stride_doh, stride_lse_h,
                offs_n, seq_len, qk_scale, start_n, diag_end,
                HEAD_DIM, BLOCK_M, POS, True, PRECISION,
            )
            dk, dv = _bwd_dkdv_inner(
                dk, dv, k, v, q_head, do_head, lse_head, delta_head,
                stride_qt, stride_qh, stride_dot, stride_doh, stride_lse_h,
                offs_n, seq_len, qk_scale, start_n + BLOCK_N, full_end,
                HEAD_DIM, BLOCK_M, POS, False, PRECISION,
            )
            dk, dv = _bwd_dkdv_inner(
                dk, dv, k, v, q_head, do_head, lse_head, delta_head,
                stride_qt, stride_qh, stride_dot, stride_doh, stride_lse_h,
                offs_n, seq_len, qk_scale, tail_start, seq_len,
                HEAD_DIM, BLOCK_M, POS, True, PRECISION,
            )

        # S = scale * q k^T, so dK = scale * dS^T q; the scale is applied once here instead of per block
        dk *= sm_scale
        tl.store(DK + offs_n[:, None] * stride_dkt + offs_d[None, :], dk.to(DK.dtype.element_ty), mask=col_mask)
        tl.store(DV + offs_n[:, None] * stride_dvt + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=col_mask)

    @triton.jit
    def _bwd_dq_inner(
        dq, q, do, lse, delta,
        K, V, stride_kt, stride_vt,
        offs_m, seq_len, qk_scale, lo, hi,
        HEAD_DIM: tl.constexpr,
        BLOCK_N: tl.constexpr,
        MASK: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM)
        kT_ptrs = K + offs_n[None, :] * stride_kt + offs_d[:, None]
        vT_ptrs = V + offs_n[None, :] * stride_vt + offs_d[:, None]
        for start_n in range(lo, hi, BLOCK_N):
            cols = start_n + offs_n
            if MASK:
                col_in = (cols < seq_len)[None, :]
                kT = tl.load(kT_ptrs + start_n * stride_kt, mask=col_in, other=0.0)
                vT = tl.load(vT_ptrs + start_n * stride_vt, mask=col_in, other=0.0)
            else:
                kT = tl.load(kT_ptrs + start_n * stride_kt)
                vT = tl.load(vT_ptrs + start_n * stride_vt)
            p = tl.math.exp2(tl.dot(q, kT, input_precision=PRECISION) * qk_scale - lse[:, None])
            if MASK:
                p = tl.where(offs_m[:, None] >= cols[None, :], p, 0.0)
            dp = tl.dot(do, vT, input_precision=PRECISION)
            ds = p * (dp - delta[:, None])
            dq = tl.dot(ds.to(kT.dtype), tl.trans(kT), dq, input_precision=PRECISION)
        return dq

    @triton.jit
    def _varlen_bwd_dq_kernel(
        Q, K, V, DO, LSE, DELTA, DQ, CU_SEQLENS,
        sm_scale, qk_scale,
        stride_qt, stride_qh,
        stride_kt, stride_kh,
        stride_vt, stride_vh,
        stride_dot, stride_doh,
        stride_dqt, stride_dqh,
        stride_lse_h,
        GROUP: tl.constexpr,
        PACK: tl.constexpr,
        HEAD_TILES: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        POS: tl.constexpr = BLOCK_M // PACK
        tl.static_assert(POS % BLOCK_N == 0)
        # heaviest (last) query blocks first, as in the forward
        sm_scale, qk_scale = tl.cast(sm_scale, tl.float32), tl.cast(qk_scale, tl.float32)
        start_m = (tl.num_programs(1) - 1 - tl.program_id(1)) * POS
        seq = tl.program_id(0) // HEAD_TILES
        head0 = tl.program_id(0) % HEAD_TILES * PACK
        seq_start = tl.load(CU_SEQLENS + seq)
        seq_len = tl.load(CU_SEQLENS + seq + 1) - seq_start
        if start_m >= seq_len:
            return
        kv_head = head0 // GROUP
        tok0 = seq_start.to(tl.int64)
        Q += tok0 * stride_qt + head0 * stride_qh
        K += tok0 * stride_kt + kv_head * stride_kh
        V += tok0 * stride_vt + kv_head * stride_vh
        DO += tok0 * stride_dot + head0 * stride_doh
        DQ += tok0 * stride_dqt + head0 * stride_dqh
        LSE += head0.to(tl.int64) * stride_lse_h + tok0
        DELTA += head0.to(tl.int64) * stride_lse_h + tok0

        rows = tl.arange(0, BLOCK_M)
        offs_m = start_m + rows % POS
        row_head = rows // POS
        offs_d = tl.arange(0, HEAD_DIM)
        row_in = offs_m < seq_len
        q = tl.load(Q + offs_m[:, None] * stride_qt + row_head[:, None] * stride_qh + offs_d[None, :],
                    mask=row_in[:, None], other=0.0)
        do = tl.load(DO + offs_m[:, None] * stride_dot + row_head[:, None] * stride_doh + offs_d[None, :],
                     mask=row_in[:, None], other=0.0)
        lse = tl.load(LSE + row_head * stride_lse_h + offs_m, mask=row_in, other=0.0)
        delta = tl.load(DELTA + row_head * stride_lse_h + offs_m, mask=row_in, other=0.0)
        dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        dq = _bwd_dq_inner(
            dq, q, do, lse, delta, K, V, stride_kt, stride_vt, offs_m, seq_len, qk_scale, 0, start_m,
            HEAD_DIM, BLOCK_N, False, PRECISION,
        )
        dq = _bwd_dq_inner(
            dq, q, do, lse, delta, K, V, stride_kt, stride_vt, offs_m, seq_len, qk_scale,
            start_m, tl.minimum(start_m + POS, seq_len),
            HEAD_DIM, BLOCK_N, True, PRECISION,
        )
        dq *= sm_scale
        dq_ptrs = DQ + offs_m[:, None] * stride_dqt + row_head[:, None] * stride_dqh + offs_d[None, :]
        tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty), mask=row_in[:, None])


# --------------------------------------------------------------------------- #
# Launch helpers
# --------------------------------------------------------------------------- #
LOG2E = 1.4426950408889634
HEAD_DIMS = (16, 32, 64, 128)
MAX_GRID_Y = 65535  # CUDA's limit on the grid's 2nd dimension (the blocks along a document)

# tuning knobs: (BLOCK_M query rows of a tile, BLOCK_N keys, num_warps, num_stages) per kernel, tuned on H100 (bf16,
# head_dim 128, 10 / 5 heads, 8 rows of 2048 tokens packed with documents of log-normal lengths around 600); the two
# backward ones re-swept on H200 with the position-major grid (14% faster backward there, the same on whole rows).
# Smaller tiles than for long sequences pay off there: a short document has proportionally more diagonal blocks, where
# half a tile is masked. The interpreter runs every op as numpy code per program, so it gets small blocks (cheap, and
# small documents still span several blocks), unequal so that one tile meets several diagonal tiles of the other kind,
# and wide enough that grouped heads share a tile in every kernel.
FWD_CONFIG = (64, 64, 4, 3)
BWD_DKDV_CONFIG = (32, 64, 4, 3)
BWD_DQ_CONFIG = (128, 32, 8, 3)
INTERPRET_CONFIGS = ((32, 16, 1, 1), (32, 64, 1, 1), (32, 16, 1, 1))
PREPROCESS_BLOCK_M = 64
# tl.dot's smallest tile side: a tile keeps at least this many positions of each of its heads
MIN_POSITIONS = 16


def _pack(group: int, block_m: int) -> int:
    """Query heads a tile of BLOCK_M rows holds: the largest power of two dividing the kv group that leaves the tile
    MIN_POSITIONS positions a head."""
    return min(group & -group, max(1, block_m // MIN_POSITIONS))


def _query_tiling(config, group: int):
    """(PACK, BLOCK_M, BLOCK_N, num_warps, num_stages) of a forward or dQ config: BLOCK_N shrinks to the tile's
    positions where it is larger, so the diagonal key blocks stay aligned with the query tile."""
    block_m, block_n, num_warps, num_stages = config
    pack = _pack(group, block_m)
    return pack, block_m, min(block_n, block_m // pack), num_warps, num_stages


def _configs(head_dim: int, on_gpu: bool):
    """(forward, dK/dV, dQ) launch configs for a head dim; tensors off the GPU reach the kernels only under
    TRITON_INTERPRET."""
    if not on_gpu:
        return INTERPRET_CONFIGS
    if head_dim <= 64:
        # half the registers per row: the same tiles fit with fewer warps
        return tuple((bm, bn, max(4, warps // 2), stages) for bm, bn, warps, stages in
                     (FWD_CONFIG, BWD_DKDV_CONFIG, BWD_DQ_CONFIG))
    return FWD_CONFIG, BWD_DKDV_CONFIG, BWD_DQ_CONFIG


def _blocks_along(max_seqlen: int, positions: int) -> int:
    """The grid's 2nd dimension: blocks of `positions` tokens covering the longest document."""
    blocks = triton.cdiv(max_seqlen, positions)
    if blocks > MAX_GRID_Y:
        raise ValueError(
            f"varlen_attention: max_seqlen {max_seqlen} needs {blocks} blocks of {positions} tokens, more than the "
            f"GPU grid's {MAX_GRID_Y}; split documents longer than {MAX_GRID_Y * positions} tokens"
        )
    return blocks


def _precision(dtype: torch.dtype) -> str:
    # fp32 inputs keep fp32-level products, as torch computes fp32 attention by default (plain tf32 would be ~1e-3
    # off); tf32x3 does that on the tensor cores, where "ieee" would unroll into scalar FMAs that compile for minutes
    return "tf32x3" if dtype == torch.float32 else "tf32"


def _check_inputs(q, k, v, cu_seqlens, max_seqlen) -> None:
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(
            "varlen_attention: q, k and v must be 3-D [total_tokens, heads, head_dim]; got q "
            f"{tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if k.shape != v.shape:
        raise ValueError(f"varlen_attention: k {tuple(k.shape)} and v {tuple(v.shape)} must have the same shape")
    total, n_heads, head_dim = q.shape
    if k.shape[0] != total or k.shape[2] != head_dim:
        raise ValueError(
            f"varlen_attention: k/v {tuple(k.shape)} must match q {tuple(q.shape)} in total_tokens and head_dim"
        )
    if k.shape[1] == 0 or n_heads % k.shape[1] != 0:
        raise ValueError(
            f"varlen_attention: q's heads ({n_heads}) must be a multiple of k/v's heads ({k.shape[1]})"
        )
    if head_dim not in HEAD_DIMS:
        raise ValueError(f"varlen_attention: head_dim {head_dim} not supported; expected one of {HEAD_DIMS}")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32) or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(
            "varlen_attention: q, k and v must share one dtype among float16, bfloat16 and float32; got "
            f"{q.dtype}, {k.dtype}, {v.dtype}"
        )
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"varlen_attention: q, k and v must be on one device; got {q.device}, {k.device}, {v.device}")
    if cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(
            "varlen_attention: cu_seqlens must be a 1-D int32 tensor [num_seqs + 1]; got "
            f"{cu_seqlens.dtype} of shape {tuple(cu_seqlens.shape)}"
        )
    if cu_seqlens.device != q.device:
        raise ValueError(f"varlen_attention: cu_seqlens is on {cu_seqlens.device}, q on {q.device}")
    # a SymInt inside a compiled graph
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, (int, torch.SymInt)) or max_seqlen < 0:
        raise ValueError(f"varlen_attention: max_seqlen must be a non-negative python int; got {max_seqlen!r}")


# The kernels run as torch.library ops: torch.compile keeps them in its graph (no graph break at every attention of a
# compiled model, whose host time an eager step pays per layer) and launches them from its generated code; an eager
# call runs the same functions. max_seqlen is an int argument, so a compiled graph takes it as a symbol.
if HAS_TRITON:

    @triton_op("nanovision::varlen_attention_forward", mutates_args=())
    def _forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
                 scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
        """(out [total, Hq, D], log2-domain row log-sum-exp [Hq, total] fp32)."""
        total, n_heads, head_dim = q.shape
        out = torch.empty((total, n_heads, head_dim), dtype=q.dtype, device=q.device)
        lse_buffer = written_buffer(n_heads * total, torch.float32, q.device)
        lse = lse_buffer.view(n_heads, total)
        if total == 0 or max_seqlen == 0:
            return out, lse
        group = n_heads // k.shape[1]
        pack, block_m, block_n, num_warps, num_stages = _query_tiling(_configs(head_dim, q.is_cuda)[0], group)
        # programs past a short document's end exit at once; numbering the blocks across documents instead (a scan of
        # cu_seqlens per program) was no faster on H100 with 2048-token rows of ~600-token documents
        grid = ((cu_seqlens.numel() - 1) * (n_heads // pack), _blocks_along(max_seqlen, block_m // pack))
        wrap_triton(_varlen_fwd_kernel)[grid](
            q, k, v, out, lse_buffer, cu_seqlens,
            scale * LOG2E,
            q.stride(0), q.stride(1),
            k.stride(0), k.stride(1),
            v.stride(0), v.stride(1),
            out.stride(0), out.stride(1),
            lse.stride(0),
            GROUP=group, PACK=pack, HEAD_TILES=n_heads // pack, HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n,
            PRECISION=_precision(q.dtype),
            num_warps=num_warps, num_stages=num_stages,
        )
        return out, lse

    @triton_op("nanovision::varlen_attention_backward", mutates_args=())
    def _backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                  lse: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
                  scale: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(dq, dk, dv) of `_forward`'s inputs."""
        total, n_heads, head_dim = q.shape
        n_kv_heads = k.shape[1]
        dq = torch.empty((total, n_heads, head_dim), dtype=q.dtype, device=q.device)
        dk = torch.empty((total, n_kv_heads, head_dim), dtype=k.dtype, device=k.device)
        dv = torch.empty((total, n_kv_heads, head_dim), dtype=v.dtype, device=v.device)
        if total == 0 or max_seqlen == 0:
            return dq, dk, dv
        num_seqs = cu_seqlens.numel() - 1
        group = n_heads // n_kv_heads
        _, (dkdv_m, dkdv_n, dkdv_warps, dkdv_stages), dq_config = _configs(head_dim, q.is_cuda)
        dkdv_pack = _pack(group, dkdv_m)
        dq_pack, dq_m, dq_n, dq_warps, dq_stages = _query_tiling(dq_config, group)
        precision = _precision(q.dtype)

        delta_buffer = written_buffer(lse.numel(), torch.float32, q.device)
        delta = delta_buffer.view(lse.shape)
        wrap_triton(_varlen_bwd_preprocess_kernel)[(triton.cdiv(total, PREPROCESS_BLOCK_M), n_heads)](
            out, do, delta_buffer,
            out.stride(0), out.stride(1),
            do.stride(0), do.stride(1),
            delta.stride(0),
            total,
            HEAD_DIM=head_dim, BLOCK_M=PREPROCESS_BLOCK_M,
        )
        wrap_triton(_varlen_bwd_dkdv_kernel)[(num_seqs * n_kv_heads, _blocks_along(max_seqlen, dkdv_n))](
            q, k, v, do, lse, delta, dk, dv, cu_seqlens,
            scale, scale * LOG2E,
            q.stride(0), q.stride(1),
            k.stride(0), k.stride(1),
            v.stride(0), v.stride(1),
            do.stride(0), do.stride(1),
            dk.stride(0), dk.stride(1),
            dv.stride(0), dv.stride(1),
            lse.stride(0),
            GROUP=group, PACK=dkdv_pack, N_KV_HEADS=n_kv_heads, HEAD_DIM=head_dim, BLOCK_M=dkdv_m, BLOCK_N=dkdv_n,
            PRECISION=precision,
            num_warps=dkdv_warps, num_stages=dkdv_stages,
        )
        dq_grid = (num_seqs * (n_heads // dq_pack), _blocks_along(max_seqlen, dq_m // dq_pack))
        wrap_triton(_varlen_bwd_dq_kernel)[dq_grid](
            q, k, v, do, lse, delta, dq, cu_seqlens,
            scale, scale * LOG2E,
            q.stride(0), q.stride(1),
            k.stride(0), k.stride(1),
            v.stride(0), v.stride(1),
            do.stride(0), do.stride(1),
            dq.stride(0), dq.stride(1),
            lse.stride(0),
            GROUP=group, PACK=dq_pack, HEAD_TILES=n_heads // dq_pack, HEAD_DIM=head_dim, BLOCK_M=dq_m, BLOCK_N=dq_n,
            PRECISION=precision,
            num_warps=dq_warps, num_stages=dq_stages,
        )
        return dq, dk, dv


def _setup_context(ctx, inputs, output):
    q, k, v, cu_seqlens, max_seqlen, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens)
    ctx.max_seqlen, ctx.scale = max_seqlen, scale


def _backward_from_context(ctx, dout, _):
    q, k, v, out, lse, cu_seqlens = ctx.saved_tensors
    dq, dk, dv = _backward(with_unit_last_stride(dout), q, k, v, out, lse, cu_seqlens, ctx.max_seqlen, ctx.scale)
    return dq, dk, dv, None, None, None


if HAS_TRITON:
    _forward.register_autograd(_backward_from_context, setup_context=_setup_context)


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    scale: Optional[float] = None,
) -> torch.Tensor:
    """Causal attention inside each packed document (Triton), grouped-query heads.

    q [total_tokens, Hq, D], k / v [total_tokens, Hkv, D] (views with unit stride along D are used in place),
    cu_seqlens int32 [num_seqs + 1] with cu_seqlens[0] == 0 and cu_seqlens[-1] == total_tokens, max_seqlen >= the
    longest document (tokens past it are not computed); scale defaults to D ** -0.5. Returns [total_tokens, Hq, D].
    """
    _check_inputs(q, k, v, cu_seqlens, max_seqlen)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    q, k, v = with_unit_last_stride(q), with_unit_last_stride(k), with_unit_last_stride(v)
    return _forward(q, k, v, cu_seqlens, max_seqlen, float(scale))[0]
