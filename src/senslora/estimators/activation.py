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
)
from senslora.estimators.token_filters import (
    calibration_mask,
    check_token_filters,
    drop_outlier_rows,
)
from senslora.stats import ModuleStats
from senslora.targets import layer_shape


class _StopForward(Exception):
    """Raised from the last hook of a forward pass once every target module has been seen."""


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

    def copy_rows(self, x: torch.Tensor) -> torch.Tensor:
        """A copy of x (..., d_in) as (tokens, d_in), only the real tokens when x is (B, T, d_in).

        Always a copy (one operation): the model may reuse or modify its activation after the
        hook, and the copy is squared in place later.
        """
        flat = x.reshape(-1, x.shape[-1])  # (..., d_in) -> (tokens, d_in)
        if self.index is None or x.dim() != 3 or tuple(x.shape[:2]) != self.shape:
            return flat.clone()
        index = self._index_by_device.get(x.device)
        if index is None:
            index = self._index_by_device[x.device] = self.index.to(x.device, non_blocking=True)
        return flat.index_select(0, index)


@dataclass
class _Pending:
    """A copy of one distinct layer input of the current batch and the modules that read it."""

    names: list[str]
    rows: torch.Tensor  # (tokens, d_in), the input's dtype


class GroupedSums:
    """Running sums of 2·x_j² (and optionally 2·XXᵀ) over the real tokens of every layer input.

    `flush` takes the pending copies (one input on the CPU, a whole forward pass elsewhere: see
    `collect_activation_statistics`), concatenates those of one width (and device and token
    count) and squares, sums and accumulates them with a handful of operations per width,
    whatever the number of modules. On a GPU a small model's forward pass is launch-bound, so
    what the statistics cost is the operations they dispatch, not their arithmetic.

    Sums are kept per *reader*: the tuple of modules that read one input (BERT's query/key/value,
    Llama's q/k/v and gate/up), one row of a (readers, d_in) float32 matrix per width and device.
    """

    def __init__(self, keep_gram: bool = False):
        self.keep_gram = keep_gram
        self.sums: dict[tuple, torch.Tensor] = {}  # (device, d_in) -> (readers, d_in)
        self.grams: dict[tuple, list[torch.Tensor]] = {}  # (device, d_in) -> [(d_in, d_in)]
        self.rows: dict[tuple[str, ...], tuple[tuple, int]] = {}  # readers -> (key, row)
        self.num_tokens: dict[tuple[str, ...], int] = {}
        self._row_index: dict[tuple, torch.Tensor] = {}

    def flush(self, pending: list[_Pending]) -> None:
        """Accumulate the pending copies (consumed: they are squared in place)."""
        groups: dict[tuple, list[_Pending]] = {}
        for item in pending:
            rows = item.rows
            groups.setdefault((rows.device, rows.shape[1], rows.shape[0]), []).append(item)
        for (device, width, tokens), items in groups.items():
            readers = [tuple(item.names) for item in items]
            rows = [self._row(device, width, r) for r in readers]
            # (n * tokens, d_in), a copy of the model's activations; under autocast some inputs
            # are float32 (after a layer norm) and others bfloat16: cat promotes them all
            if len(items) == 1:
                x = items[0].rows.float()
            else:
                with torch.autocast(device.type, enabled=False):  # else one cast per input
                    x = torch.cat([i.rows for i in items]).float()
            if self.keep_gram:
                for i, row in enumerate(rows):
                    block = x[i * tokens : (i + 1) * tokens]
                    self.grams[(device, width)][row].addmm_(block.t(), block, alpha=2.0)
            squares = x.square_().view(len(items), tokens, width).sum(dim=1)  # (n, d_in)
            self.sums[(device, width)].index_add_(
                0, self._index(device, tuple(rows)), squares, alpha=2.0
            )
            for r in readers:
                self.num_tokens[r] = self.num_tokens.get(r, 0) + tokens

    def _row(self, device: torch.device, width: int, readers: tuple[str, ...]) -> int:
        """The accumulator row of ``readers``, added (zero) on first sight."""
        key = (device, width)
        if readers not in self.rows:
            table = self.sums.get(key)
            row = 0 if table is None else table.shape[0]
            zero = torch.zeros(1, width, dtype=torch.float32, device=device)
            self.sums[key] = zero if table is None else torch.cat([table, zero])
            if self.keep_gram:
                self.grams.setdefault(key, []).append(
                    torch.zeros(width, width, dtype=torch.float32, device=device)
                )
            self.rows[readers] = (key, row)
        return self.rows[readers][1]

    def _index(self, device: torch.device, rows: tuple[int, ...]) -> torch.Tensor:
        """The rows as an index tensor on ``device``, built once per distinct tuple."""
        index = self._row_index.get((device, rows))
        if index is None:
            index = torch.tensor(rows, dtype=torch.long).to(device, non_blocking=True)
            self._row_index[(device, rows)] = index
        return index

    def module_sums(
        self, modules: Mapping[str, tuple[int, torch.device]]
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor | None, int]]:
        """``{name: (2·Σ x_j², 2·XXᵀ or None, tokens)}`` of every module, given its
        ``(d_in, device)``; every module gets tensors of its own.

        A module is the sum of the reader tuples it belongs to (counted as often as it appears
        in each). Modules in exactly one tuple, once, on the device of its sums (every module of
        a model called the same way on every batch) are taken from each (readers, d_in) table
        with one ``index_select``, whatever their number; the others one by one.
        """
        member: dict[str, list[tuple[tuple[str, ...], int]]] = {name: [] for name in modules}
        for readers in self.rows:
            for name in set(readers):
                if name in member:
                    member[name].append((readers, readers.count(name)))
        out: dict[str, tuple[torch.Tensor, torch.Tensor | None, int]] = {}
        gathered: dict[tuple, list[tuple[str, tuple[str, ...], int]]] = {}  # table -> rows
        for name, tuples in member.items():
            width, device = modules[name]
            if len(tuples) == 1 and tuples[0][1] == 1:
                readers = tuples[0][0]
                key, row = self.rows[readers]
                if key == (device, width):
                    gathered.setdefault(key, []).append((name, readers, row))
                    continue
            out[name] = self._sum_of(tuples, width, device)
        for key, entries in gathered.items():
            index = self._index(key[0], tuple(row for _, _, row in entries))
            rows = self.sums[key].index_select(0, index).unbind(0)  # fresh, one row per module
            for (name, readers, row), values in zip(entries, rows, strict=True):
                gram = self.grams[key][row].clone() if self.keep_gram else None
                out[name] = (values, gram, self.num_tokens.get(readers, 0))
        return {name: out[name] for name in modules}

    def _sum_of(self, tuples, width, device):
        """The general case of `module_sums` for one module (also: a module never called)."""
        squares = torch.zeros(width, dtype=torch.float32, device=device)
        gram = (
            torch.zeros(width, width, dtype=torch.float32, device=device)
            if self.keep_gram
            else None
        )
        tokens = 0
        for readers, times in tuples:
            key, row = self.rows[readers]
            squares.add_(self.sums[key][row].to(device), alpha=times)
            if gram is not None:
                gram.add_(self.grams[key][row].to(device), alpha=times)
            tokens += times * self.num_tokens.get(readers, 0)
        return squares, gram, tokens


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


GROUPED_FLUSH_BYTES = 256 * 2**20
"""Off the CPU, the copies of the hooked inputs are reduced together once they hold this much."""


def default_flush_bytes(device: torch.device) -> int:
    """``flush_bytes`` of `collect_activation_statistics` when not given: 0 (every input reduced
    on its own) on the CPU, `GROUPED_FLUSH_BYTES` on any other device."""
    return 0 if device.type == "cpu" else GROUPED_FLUSH_BYTES


def collect_activation_statistics(
    model: nn.Module,
    modules: dict[str, nn.Module],
    batches: Iterable[Batch],
    *,
    keep_gram: bool = False,
    autocast_dtype: torch.dtype | None = None,
    stop_early: bool = True,
    regroup: bool = True,
    flush_bytes: int | None = None,
    skip_positions: int = 0,
    outlier_factor: float | None = None,
) -> dict[str, ModuleStats]:
    """Accumulate the activation Hessian diagonal of every module over the calibration batches.

    With ``stop_early`` the forward pass is cut after the last hooked call (counted on the first
    batch), so heads after the last target module (e.g. a large ``lm_head``) are never computed.
    With ``regroup`` the sequences are regrouped by length first (`regroup_by_length`), so that
    little padding is computed; the statistics are the same up to the order of float additions.
    Modules called one after the other on the very same input tensor (BERT's query/key/value,
    Llama's q/k/v and gate/up projections) share one computation of its sums (the same tensor
    object in consecutive hooked calls; a model that changed it in place in between would be
    miscounted).

    Each hook only copies the real tokens of its input (one operation); the copies are reduced
    (squared, summed over tokens, accumulated) together once they hold ``flush_bytes``, and at
    the end of every forward pass, see `GroupedSums`. The memory they take is bounded by
    ``flush_bytes`` plus one input. ``flush_bytes=0`` reduces every input on its own as soon as
    the next one arrives. None (the default) picks by device: 0 on the CPU, where the reduction
    costs memory traffic and one more pass over the copies would cost more than it saves, and
    `GROUPED_FLUSH_BYTES` elsewhere, where a small model's forward pass is launch-bound and
    what the statistics cost is the number of operations they dispatch.

    ``skip_positions`` and ``outlier_factor`` leave attention-sink tokens out of the statistics
    (off by default; see `senslora.estimators.token_filters`). ``num_tokens`` then counts only
    the tokens kept.
    """
    device = input_device(model)
    if flush_bytes is None:
        flush_bytes = default_flush_bytes(device)
    if flush_bytes < 0:
        raise ValueError(f"flush_bytes must be >= 0, got {flush_bytes}")
    check_token_filters(skip_positions, outlier_factor)
    state = _HookState(GroupedSums(keep_gram), flush_bytes, outlier_factor)

    def make_hook(name: str):
        def hook(_module, inputs, _output):
            state.record(name, inputs[0])
            state.calls += 1
            if state.limit is not None and state.calls >= state.limit:
                raise _StopForward

        return hook

    if regroup:
        batches = regroup_by_length(batches)
    handles = [m.register_forward_hook(make_hook(name)) for name, m in modules.items()]
    was_training = model.training
    any_training = any(m.training for m in model.modules())
    if any_training:  # model.eval() walks and sets every module: skipped when nothing trains
        model.eval()
    try:
        with torch.inference_mode(), _autocast(device, autocast_dtype):
            for batch in batches:
                # before the copy to device
                state.start_batch(RealTokens(calibration_mask(batch, skip_positions)))
                try:
                    forward(model, to_device(batch, device), with_labels=False)
                except _StopForward:
                    pass
                state.flush()
                if stop_early and state.limit is None:
                    state.limit = state.calls
    finally:
        for handle in handles:
            handle.remove()
        state.start_batch(None)  # drop the references to the last batch
        if any_training:
            model.train(was_training)
    shapes = {name: layer_shape(module) for name, module in modules.items()}
    sums = state.sums.module_sums(
        {
            name: (shapes[name].in_features, module_device(module, device))
            for name, module in modules.items()
        }
    )
    return {
        name: ModuleStats(
            name=name,
            shape=shapes[name],
            estimator="activation",
            column_values=squares,
            gram=gram,
            num_tokens=tokens,
        )
        for name, (squares, gram, tokens) in sums.items()
    }


class _HookState:
    """What the hooks share during one forward pass: the batch's real tokens, the number of hooked
    calls so far and the copies of the distinct inputs seen, not yet reduced."""

    def __init__(self, sums: GroupedSums, flush_bytes: int, outlier_factor: float | None = None):
        self.sums = sums
        self.flush_bytes = flush_bytes
        self.outlier_factor = outlier_factor
        self.tokens: RealTokens | None = None
        self.calls = 0
        self.limit: int | None = None
        self._pending: list[_Pending] = []
        self._pending_bytes = 0
        self._last_input: torch.Tensor | None = None

    def start_batch(self, tokens: RealTokens | None) -> None:
        self.tokens, self.calls = tokens, 0
        self._pending, self._pending_bytes, self._last_input = [], 0, None

    def record(self, name: str, x: torch.Tensor) -> None:
        """Note that module ``name`` read ``x``: a new copy, unless ``x`` is the very tensor of
        the previous hooked call (then the module joins that input's readers)."""
        if x is self._last_input and self._pending:
            self._pending[-1].names.append(name)
            return
        if self._pending_bytes >= self.flush_bytes:
            self.flush()  # only between distinct inputs: readers of one input stay together
        rows = self.tokens.copy_rows(x.detach())
        if self.outlier_factor is not None:
            rows = drop_outlier_rows(rows, self.outlier_factor)
        self._pending.append(_Pending([name], rows))
        self._pending_bytes += rows.numel() * rows.element_size()
        self._last_input = x

    def flush(self) -> None:
        pending, self._pending, self._pending_bytes = self._pending, [], 0
        if pending:
            self.sums.flush(pending)


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return torch.autocast(device_type=device.type, enabled=False)
    return torch.autocast(device_type=device.type, dtype=dtype)
