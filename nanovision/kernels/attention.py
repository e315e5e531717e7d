"""Packed (varlen) attention as a transformers attention implementation: `attn_implementation="nanovision_varlen"`.

Importing this module registers it with transformers' AttentionInterface for every model. Its mask hook is the
flash one: no mask for plain causal batches, the 2D padding mask otherwise (turned into documents below).
"""

from typing import Optional

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

from . import dispatch

VARLEN_ATTENTION = "nanovision_varlen"


def document_bounds(position_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None):
    """(cu_seqlens int32, longest document) over the flattened [B * T] tokens of `position_ids` [B, T]: a document
    starts at each row start, where position_ids restart at 0, and where a 2D padding mask switches between padding
    and tokens (so padding never shares a document with real tokens)."""
    starts = position_ids == 0
    starts[:, 0] = True
    if attention_mask is not None:
        starts[:, 1:] |= attention_mask[:, 1:] != attention_mask[:, :-1]
    first = starts.reshape(-1).nonzero()[:, 0]
    bounds = torch.cat([first, first.new_tensor([starts.numel()])]).to(torch.int32)
    return bounds, int((bounds[1:] - bounds[:-1]).max())


def varlen_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                             position_ids=None, cu_seq_lens_q=None, max_length_q=None, **kwargs):
    """transformers attention interface (query [B, Hq, T, D], key/value [B, Hkv, S, D] -> [B, T, Hq, D], None)
    for packed rows: each document attends causally to itself only, with no [T, T] mask and no work on
    cross-document pairs. Documents come from the collator's `cu_seq_lens_q` / `max_length_q`
    (PackedDataCollator(return_flash_attn_kwargs=True)) or else from `position_ids` restarting at 0.

    Decoding against a KV cache (fewer queries than keys) is not packed work: it runs through SDPA, and so does a
    bidirectional module (`is_causal=False`: the SigLIP vision tower, whose config the model's attention setting
    also reaches; its images are never packed)."""
    if not kwargs.get("is_causal", getattr(module, "is_causal", True)):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if dropout:
        raise ValueError(f"attn_implementation={VARLEN_ATTENTION!r} has no attention dropout; set attention_dropout=0.")
    device = query.device.type
    if torch.is_autocast_enabled(device):
        # what autocast does for SDPA: under autocast, q/k leave RoPE's fp32 tables in fp32 while v comes out of its
        # projection in the autocast dtype
        dtype = torch.get_autocast_dtype(device)
        query, key, value = query.to(dtype), key.to(dtype), value.to(dtype)
    batch, heads, length, head_dim = query.shape
    if key.shape[2] != length:
        # the flash-style mask hook gives no mask or a 2D padding one: spell out causality against the cached past
        past = key.shape[2] - length
        allowed = torch.ones(length, key.shape[2], dtype=torch.bool, device=query.device).tril(past)[None, None]
        if attention_mask is not None and attention_mask.dim() == 2:
            allowed = allowed & attention_mask[:, None, None, :].bool()
        return sdpa_attention_forward(module, query, key, value, allowed, dropout=0.0, scaling=scaling, **kwargs)
    if cu_seq_lens_q is None:
        if position_ids is None:
            position_ids = torch.arange(length, device=query.device)[None]
        mask = attention_mask if attention_mask is not None and attention_mask.dim() == 2 else None
        cu_seq_lens_q, max_length_q = document_bounds(position_ids.expand(batch, length), mask)
    # [B, H, T, D] views of [B, T, H, D] projections: back to token-major rows, a view when nothing reordered them
    out = dispatch.varlen_attention(query.transpose(1, 2).reshape(batch * length, heads, head_dim),
                                    key.transpose(1, 2).reshape(batch * length, key.shape[1], head_dim),
                                    value.transpose(1, 2).reshape(batch * length, value.shape[1], head_dim),
                                    cu_seq_lens_q.to(device=query.device, dtype=torch.int32), int(max_length_q),
                                    scaling)
    return out.view(batch, length, heads, head_dim), None


AttentionInterface.register(VARLEN_ATTENTION, varlen_attention_forward)
AttentionMaskInterface.register(VARLEN_ATTENTION, flash_attention_mask)
