"""The `activation` estimator: the GPTQ layer-wise Hessian from forward hooks (paper, Section 4.6).

For a linear layer y = W x with squared-error reconstruction loss, the Hessian with respect to one
row of W is H = 2·XXᵀ, with X the (d_in, tokens) matrix of the layer's inputs (Frantar et al.,
2022, as used by the paper). Every output row shares it, so the diagonal entry of weight (i, j) is
2·Σ_t x_tj²: one value per input column. No labels and no backward pass are needed; padding tokens
are masked out.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from senslora.batches import (
    Batch,
    forward,
    input_device,
    module_device,
    to_device,
    token_mask,
)
from senslora.statistics import ModuleStats
from senslora.targets import layer_shape


class _StopForward(Exception):
    """Raised from the last hook of a forward pass once every target module has been seen."""


class ActivationAccumulator:
    """Running sums of 2·x_j² (and optionally 2·XXᵀ) over the real tokens of one layer's input."""

    def __init__(self, in_features: int, device: torch.device, keep_gram: bool = False):
        self.column_sums = torch.zeros(in_features, dtype=torch.float32, device=device)
        self.gram = (
            torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
            if keep_gram
            else None
        )
        self.num_tokens = 0

    def add(self, x: torch.Tensor, mask: torch.Tensor | None) -> None:
        """Accumulate one batch of inputs x (..., d_in); mask (B, T) selects the real tokens."""
        rows, copied = RealTokens(mask).rows(x)
        self.add_sums(input_sums(rows, copied=copied, keep_gram=self.gram is not None))

    def add_sums(self, sums: InputSums) -> None:
        """Accumulate the sums of one batch of inputs (shared by modules that read one input)."""
        device = self.column_sums.device
        self.column_sums.add_(sums.squares.to(device, non_blocking=True), alpha=2.0)
        if self.gram is not None and sums.gram is not None:
            self.gram.add_(sums.gram.to(device, non_blocking=True), alpha=2.0)
        self.num_tokens += sums.num_tokens


class RealTokens:
    """The real (non-padding) tokens of one batch, as row indices into the flattened (B*T) inputs.

    The indices are computed once per batch from the attention mask, on the mask's device (the
    CPU for calibration batches, so no device synchronisation), and copied once to each device
    that asks; every hook then gathers its rows with ``index_select`` instead of boolean
    indexing, which would synchronise with the device on every call.
    """

    def __init__(self, mask: torch.Tensor | None):
        self.shape = tuple(mask.shape) if mask is not None and mask.dim() == 2 else None
        self.index = None
        if self.shape is not None and not bool(mask.all()):
            self.index = mask.reshape(-1).nonzero().squeeze(1)  # (B, T) -> (real tokens,)
        self._index_by_device: dict[torch.device, torch.Tensor] = {}

    def rows(self, x: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """x (..., d_in) -> (tokens, d_in), only the real tokens when x is (B, T, d_in); and
        whether the rows are a copy (True) or may share x's memory (False)."""
        flat = x.reshape(-1, x.shape[-1])  # (..., d_in) -> (tokens, d_in)
        if self.index is None or x.dim() != 3 or tuple(x.shape[:2]) != self.shape:
            return flat, False
        index = self._index_by_device.get(x.device)
        if index is None:
            index = self._index_by_device[x.device] = self.index.to(x.device, non_blocking=True)
        return flat.index_select(0, index), True


@dataclass
class InputSums:
    """Σ_t x_tj² per column (and Σ_t x_t x_tᵀ) of one batch of a layer's input, float32."""

    squares: torch.Tensor
    gram: torch.Tensor | None
    num_tokens: int


def input_sums(rows: torch.Tensor, *, copied: bool, keep_gram: bool) -> InputSums:
    """Column sums of squares (and the Gram matrix) of ``rows`` (tokens, d_in), in float32.

    ``rows`` is squared in place only when it is a copy (``copied``, or a float32 copy of a
    low-precision input); a view of a model activation is never written to.
    """
    copied = copied or rows.dtype != torch.float32
    rows = rows.float()
    gram = rows.t() @ rows if keep_gram else None  # (d_in, tokens) @ (tokens, d_in)
    squares = rows.square_() if copied else rows.square()
    return InputSums(squares.sum(dim=0), gram, rows.shape[0])


_REGROUP_PADDING = {"input_ids": 0, "attention_mask": 0, "token_type_ids": 0}
"""The keys a batch may have to be regrouped, with the value their padding gets."""


def regroup_by_length(batches: Iterable[Batch], window: int = 64) -> Iterator[Batch]:
    """The same sequences with their padding cut to a minimum: the rows of up to ``window``
    consecutive batches sorted by length (shortest first) and re-padded into batches of the
    original sizes.

    The activation statistics are sums over real tokens, so which sequences share a batch does
    not matter to them, but a forward pass pays for every padded position: on randomly ordered
    text (128 Wikipedia paragraphs cut at 256 tokens, batches of 8) half the positions are
    padding. Only dict batches of ``input_ids`` / ``attention_mask`` / ``token_type_ids`` whose
    rows are all padded on the same side (right, or left) are regrouped, keeping that side;
    anything else (tuples, other keys, holes in a mask) passes through unchanged, in order.
    Sequences without any real token are dropped.
    """
    pending: list[tuple[list[dict[str, torch.Tensor]], int, str]] = []
    for batch in batches:
        split = _split_rows(batch)
        if split is not None and pending and split[2] != pending[0][2]:
            yield from _regrouped(pending)
            pending = []
        if split is None:
            yield from _regrouped(pending)
            pending = []
            yield batch
            continue
        pending.append(split)
        if len(pending) == window:
            yield from _regrouped(pending)
            pending = []
    yield from _regrouped(pending)


def _split_rows(batch: Batch) -> tuple[list[dict[str, torch.Tensor]], int, str] | None:
    """(the real tokens of every row, batch size, padding side) or None if not regroupable."""
    if not isinstance(batch, Mapping) or not set(batch) <= set(_REGROUP_PADDING):
        return None
    mask = batch.get("attention_mask")
    if mask is None or mask.dim() != 2 or mask.device.type != "cpu":
        return None
    if any(not torch.is_tensor(v) or v.shape != mask.shape for v in batch.values()):
        return None
    rows, width = mask.shape
    lengths = (mask != 0).sum(dim=1)
    columns = torch.arange(width)
    if torch.equal(mask != 0, columns < lengths[:, None]):
        side, starts = "right", torch.zeros_like(lengths)
    elif torch.equal(mask != 0, columns >= (width - lengths)[:, None]):
        side, starts = "left", width - lengths
    else:
        return None
    spans = zip(starts.tolist(), lengths.tolist(), strict=True)
    split = [
        {key: value[i, start : start + n] for key, value in batch.items()}
        for i, (start, n) in enumerate(spans)
        if n > 0
    ]
    return split, rows, side


def _regrouped(pending) -> Iterator[Batch]:
    """Re-pad the rows of ``pending`` batches, sorted by length, into batches of the same sizes."""
    if not pending:
        return
    side = pending[0][2]
    rows = sorted(
        (row for split, _, _ in pending for row in split), key=lambda r: r["attention_mask"].numel()
    )
    start = 0
    for _, size, _ in pending:
        chunk = rows[start : start + size]
        start += size
        if chunk:
            yield _pad_rows(chunk, side)


def _pad_rows(rows: list[dict[str, torch.Tensor]], side: str) -> dict[str, torch.Tensor]:
    width = max(row["attention_mask"].numel() for row in rows)
    batch = {}
    for key, first in rows[0].items():
        padded = first.new_full((len(rows), width), _REGROUP_PADDING[key])
        for i, row in enumerate(rows):
            n = row[key].numel()
            if side == "left":
                padded[i, width - n :] = row[key]
            else:
                padded[i, :n] = row[key]
        batch[key] = padded
    return batch


def collect_activation_statistics(
    model: nn.Module,
    modules: dict[str, nn.Module],
    batches: Iterable[Batch],
    *,
    keep_gram: bool = False,
    autocast_dtype: torch.dtype | None = None,
    stop_early: bool = True,
    regroup: bool = True,
) -> dict[str, ModuleStats]:
    """Accumulate the activation Hessian diagonal of every module over the calibration batches.

    With ``stop_early`` the forward pass is cut after the last hooked call (counted on the first
    batch), so heads after the last target module (e.g. a large ``lm_head``) are never computed.
    With ``regroup`` the sequences are regrouped by length first (`regroup_by_length`), so that
    little padding is computed; the statistics are the same up to the order of float additions.
    Modules called one after the other on the very same input tensor (BERT's query/key/value,
    Llama's q/k/v and gate/up projections) share one computation of its sums.
    """
    device = input_device(model)
    accumulators = {
        name: ActivationAccumulator(
            layer_shape(m).in_features, _module_device(m, device), keep_gram
        )
        for name, m in modules.items()
    }
    state = _HookState()

    def make_hook(name: str):
        def hook(_module, inputs, _output):
            accumulators[name].add_sums(state.sums_of(inputs[0], keep_gram))
            state.calls += 1
            if state.limit is not None and state.calls >= state.limit:
                raise _StopForward

        return hook

    if regroup:
        batches = regroup_by_length(batches)
    handles = [m.register_forward_hook(make_hook(name)) for name, m in modules.items()]
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), _autocast(device, autocast_dtype):
            for batch in batches:
                state.start_batch(RealTokens(token_mask(batch)))  # before the copy to device
                try:
                    forward(model, to_device(batch, device), with_labels=False)
                except _StopForward:
                    pass
                if stop_early and state.limit is None:
                    state.limit = state.calls
    finally:
        for handle in handles:
            handle.remove()
        state.start_batch(None)  # drop the references to the last batch
        model.train(was_training)
    return {
        name: ModuleStats(
            name=name,
            shape=layer_shape(modules[name]),
            estimator="activation",
            column_values=acc.column_sums,
            gram=acc.gram,
            num_tokens=acc.num_tokens,
        )
        for name, acc in accumulators.items()
    }


class _HookState:
    """What the hooks share during one forward pass: the batch's real tokens, the number of hooked
    calls so far and the last input seen with its sums."""

    def __init__(self):
        self.tokens: RealTokens | None = None
        self.calls = 0
        self.limit: int | None = None
        self._last_input: torch.Tensor | None = None
        self._last_sums: InputSums | None = None

    def start_batch(self, tokens: RealTokens | None) -> None:
        self.tokens, self.calls = tokens, 0
        self._last_input = self._last_sums = None

    def sums_of(self, x: torch.Tensor, keep_gram: bool) -> InputSums:
        """The sums of ``x``, reused when ``x`` is the very tensor of the previous hooked call."""
        if x is not self._last_input or self._last_sums is None:
            rows, copied = self.tokens.rows(x.detach())
            self._last_sums = input_sums(rows, copied=copied, keep_gram=keep_gram)
            self._last_input = x
        return self._last_sums


def _module_device(module: nn.Module, fallback: torch.device) -> torch.device:
    """Where the module's inputs arrive: its weight's device, or for a weight offloaded by
    accelerate (meta device) the execution device of its hook."""
    return module_device(module, fallback)


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return torch.autocast(device_type=device.type, enabled=False)
    return torch.autocast(device_type=device.type, dtype=dtype)
