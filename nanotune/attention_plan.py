"""How tokens may see each other, decided once per forward and shared by every layer.

An `AttentionPlan` says which keys each query attends to: one causal sequence per row, packed
documents (block-diagonal causal, by spans, mask or flex_attention), a sliding window, or the
padding of a KV cache (kv_cache.py makes its own plan). `attend` runs SDPA under a plan.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

@dataclass
class AttentionPlan:
    """Which tokens each token attends to, worked out once per forward and used by every layer.

    kind:
      "causal"  every row is one causal sequence: SDPA with `is_causal=True`, no mask tensor.
      "spans"   packed rows on the CPU: SDPA with `is_causal=True` on each document span alone,
                so the work between documents is never done (see README's performance section).
      "mask"    a boolean mask (B, 1, T, S): True where attention is allowed (KV cache with
                padding, or packed rows when spans are not wanted).
      "flex"    packed rows on CUDA: `flex_attention` with a block mask that skips whole tiles
                between documents.

    `window` W (sliding window): a query also sees only the W newest keys, itself included
    (`causal_window`); a plan without a window in reach (T <= W) stays the window-free one.

    "auto" picks flex on CUDA and spans on the CPU. A caller that torch.compiles the blocks must
    resolve "auto" itself (`resolve_packed_attention`): compile bakes the spans' Python integers
    into the graph, so every new packing would recompile; one graph serves every mask tensor.
    """

    kind: str
    spans: list[list[tuple[int, int]]] | None = None  # per row: (start, end) of each document
    mask: torch.Tensor | None = None  # (B, 1, T, S) bool
    block_mask: Any = None
    window: int | None = None  # the spans' sliding window (the other kinds carry it in their mask)


def document_spans(document_ids: torch.Tensor) -> list[list[tuple[int, int]]]:
    """Runs of equal document id per row: [[(0, 5), (5, 12), ...], ...]. One host copy per forward."""
    ids = document_ids.cpu()
    B, T = ids.shape
    change = torch.ones(B, T, dtype=torch.bool)
    change[:, 1:] = ids[:, 1:] != ids[:, :-1]
    spans = []
    for row in change:
        starts = row.nonzero().flatten().tolist()
        spans.append(list(zip(starts, starts[1:] + [T])))  # (start, end) of each run
    return spans


def causal_window(query_position, key_position, window: int | None):
    """True where a query may see a key: not after it and, with a sliding window W, one of the W
    newest keys, itself included (`key > query - W`, transformers' convention). Broadcasts."""
    allowed = key_position <= query_position
    return allowed if window is None else allowed & (key_position > query_position - window)


def causal_window_mask(T: int, window: int | None, device) -> torch.Tensor:
    """(T, T) bool: `causal_window` for one sequence of T tokens."""
    position = torch.arange(T, device=device)
    return causal_window(position[:, None], position[None, :], window)


def block_diagonal_causal_mask(document_ids: torch.Tensor, window: int | None = None) -> torch.Tensor:
    """(B, 1, T, T) bool: token t may see token s iff s <= t (within the window) and both belong to
    the same document."""
    same_document = document_ids[:, :, None] == document_ids[:, None, :]  # (B, T, T)
    return (same_document & causal_window_mask(document_ids.shape[1], window, document_ids.device)).unsqueeze(1)


def make_attention_plan(
    document_ids: torch.Tensor | None, kv_cache, T: int, packed_attention: str,
    window: int | None = None, device=None,
) -> AttentionPlan:
    """A KV cache plans its own attention; packed rows (document_ids) follow `packed_attention`."""
    if kv_cache is not None:
        return kv_cache.attention_plan(T, window)
    if window is not None and T <= window:
        window = None  # no query reaches past the window: the plan without one is the same, and fast
    if document_ids is None:
        return AttentionPlan("causal") if window is None else AttentionPlan("mask", mask=causal_window_mask(T, window, device))
    if packed_attention == "auto":
        packed_attention = "flex" if document_ids.is_cuda else "spans"
    if packed_attention == "spans":
        return AttentionPlan("spans", spans=document_spans(document_ids), window=window)
    if packed_attention == "mask":
        return AttentionPlan("mask", mask=block_diagonal_causal_mask(document_ids, window))
    if packed_attention == "flex":
        return AttentionPlan("flex", block_mask=_flex_block_mask(document_ids, window))
    raise ValueError(f"packed_attention must be auto, spans, mask or flex, not {packed_attention!r}")


def resolve_packed_attention(setting: str, compiled: bool, device: torch.device | str) -> str:
    """The `packed_attention` to build a Llama with, knowing whether its blocks will be compiled:
    "auto" for compiled blocks off CUDA becomes "mask", which never recompiles (see AttentionPlan)."""
    if setting == "auto" and compiled and torch.device(device).type != "cuda":
        return "mask"
    return setting


def _flex_block_mask(document_ids: torch.Tensor, window: int | None):
    from torch.nn.attention.flex_attention import create_block_mask

    def same_document_causal(b, h, q_idx, kv_idx):
        return (document_ids[b, q_idx] == document_ids[b, kv_idx]) & causal_window(q_idx, kv_idx, window)

    B, T = document_ids.shape
    return create_block_mask(same_document_causal, B, None, T, T, device=document_ids.device)


_compiled_flex_attention = None


def _flex_attention(q, k, v, block_mask):
    global _compiled_flex_attention
    from torch.nn.attention.flex_attention import flex_attention

    if _compiled_flex_attention is None:
        # flex_attention is only fast compiled; compile it once for the process.
        _compiled_flex_attention = torch.compile(flex_attention, dynamic=False) if q.is_cuda else flex_attention
    return _compiled_flex_attention(q, k, v, block_mask=block_mask, enable_gqa=k.shape[1] != q.shape[1])


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: AttentionPlan) -> torch.Tensor:
    """Scaled dot-product attention of q (B, H, T, D) over k, v (B, H_kv, S, D) under `plan`."""
    gqa = k.shape[1] != q.shape[1]
    if plan.kind == "causal":
        return F.scaled_dot_product_attention(q, k, v, is_causal=q.shape[2] > 1, enable_gqa=gqa)
    if plan.kind == "mask":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=plan.mask, enable_gqa=gqa)
    if plan.kind == "spans":
        return attend_per_document(q, k, v, plan.spans, gqa, plan.window)
    if plan.kind == "flex":
        return _flex_attention(q, k, v, plan.block_mask)
    raise ValueError(f"unknown attention plan {plan.kind!r}")


def attend_per_document(q, k, v, spans: list[list[tuple[int, int]]], gqa: bool, window: int | None = None):
    """Causal SDPA run on each document span of each row alone: q (B, H, T, D) -> (B, H, T, D).
    A document longer than the sliding window gets the banded mask; the others stay `is_causal`.

    Rows are taken apart with `unbind` and documents with `split`, not by indexing: the backward
    of each index is a zero-filled tensor of q's full size; that of split and unbind is one concat.
    """

    def attend_document(q_doc, k_doc, v_doc):  # (H, T_d, D) each
        T_d = q_doc.shape[1]
        mask = causal_window_mask(T_d, window, q.device) if window is not None and T_d > window else None
        return F.scaled_dot_product_attention(
            q_doc[None], k_doc[None], v_doc[None], attn_mask=mask, is_causal=mask is None, enable_gqa=gqa)[0]

    rows = []
    for q_row, k_row, v_row, row_spans in zip(q.unbind(0), k.unbind(0), v.unbind(0), spans):  # (H, T, D) each
        lengths = [end - start for start, end in row_spans]
        pieces = [attend_document(*documents) for documents in
                  zip(q_row.split(lengths, 1), k_row.split(lengths, 1), v_row.split(lengths, 1))]  # (H, T_d, D) each
        rows.append(torch.cat(pieces, dim=1) if len(pieces) > 1 else pieces[0])
    return torch.stack(rows)
