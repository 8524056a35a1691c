"""Modality adapters: turn a batch into per-sample implicit log-ratios ℓ for the loss core."""

from mmpref.adapters.causal_lm import TokenizedRow, collate, layout_for, response_logps, tokenize_row

__all__ = ["TokenizedRow", "collate", "layout_for", "response_logps", "tokenize_row"]
