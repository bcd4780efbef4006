"""Which calibration tokens enter the activation statistics: options for decoders with attention
sinks and massive activations.

Decoders of the Llama family (SmolLM2, Gemma 3, ...) put a few activations orders of magnitude
above the rest on a handful of tokens, above all the first token of a sequence (Sun et al., 2024,
"Massive activations in large language models"; Xiao et al., 2024, attention sinks). They are a
fixed bias of the pretrained network, the same whatever the text: the model uses them as a
no-op target for attention. The activation Hessian 2·XXᵀ sums the squared inputs over tokens, so
the one sink token of each sequence can hold nearly all of a ``down_proj``'s trace, and the trace
then measures the sink, not how the layer reads the text that an adapter is trained on (see the
"Decoders and massive activations" section of docs/method.md). Two ways to leave it out, both
off by default:

* ``skip_positions=n``: the first n real tokens of every sequence are not counted (the sink
  position, whatever its content);
* ``outlier_factor=f``: in each hooked input of each batch, tokens whose input vector has an
  ℓ2 norm above f times the median norm of that input's tokens are not counted (sinks
  wherever they are: BOS, the first delimiter, ...).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from senslora.batches import Batch, token_mask


def check_token_filters(skip_positions: int, outlier_factor: float | None) -> None:
    """ValueError unless ``skip_positions`` is an int >= 0 and ``outlier_factor`` None or > 1."""
    if isinstance(skip_positions, bool) or not isinstance(skip_positions, int):
        raise ValueError(f"skip_positions must be an int >= 0, got {skip_positions!r}")
    if skip_positions < 0:
        raise ValueError(f"skip_positions must be an int >= 0, got {skip_positions}")
    if outlier_factor is not None and not float(outlier_factor) > 1.0:
        # <= 1 would drop up to half of the tokens of every input, not outliers
        raise ValueError(f"outlier_factor must be None or a number > 1, got {outlier_factor!r}")


def skip_leading_tokens(mask: torch.Tensor, skip_positions: int) -> torch.Tensor:
    """The (B, T) bool ``mask`` of real tokens without the first ``skip_positions`` real tokens of
    each row (wherever the padding is)."""
    mask = mask.bool()
    if skip_positions == 0:
        return mask
    rank = mask.long().cumsum(dim=1)  # (B, T): 1 at the first real token of a row, 2 at the next
    return mask & (rank > skip_positions)


def calibration_mask(batch: Batch, skip_positions: int) -> torch.Tensor | None:
    """The (B, T) mask of the tokens a batch contributes: its attention mask (None if it has none)
    less the first ``skip_positions`` real tokens of each sequence. A batch without an attention
    mask is taken as all real tokens, shaped like its ``input_ids`` (or first tuple element)."""
    mask = token_mask(batch)
    if skip_positions == 0:
        return mask
    if mask is None:
        ids = batch.get("input_ids") if isinstance(batch, Mapping) else batch[0]
        if not torch.is_tensor(ids) or ids.dim() != 2:
            raise ValueError(
                "skip_positions needs (B, T) token batches: an attention_mask or 2-D input_ids, "
                f"got {type(ids).__name__} {getattr(ids, 'shape', '')}"
            )
        mask = torch.ones(ids.shape, dtype=torch.bool, device=ids.device)
    return skip_leading_tokens(mask, skip_positions)


def drop_outlier_rows(rows: torch.Tensor, outlier_factor: float) -> torch.Tensor:
    """The rows of ``rows`` (tokens, d_in) whose ℓ2 norm is at most ``outlier_factor`` times the
    median row norm; all of them when the median norm is 0 (no scale to compare with).

    The median is that of this input's tokens in this batch: a robust scale that a few sink
    tokens cannot move, so at least half of the tokens are always kept.
    """
    norms = torch.linalg.vector_norm(rows.float(), dim=1)  # (tokens,)
    median = norms.median()
    if rows.shape[0] == 0 or not bool(median > 0):
        return rows
    keep = norms <= outlier_factor * median
    if bool(keep.all()):
        return rows
    return rows[keep]
