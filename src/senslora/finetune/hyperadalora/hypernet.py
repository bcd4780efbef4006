"""The attention hypernetwork of HyperAdaLoRA: one token per rank component, all factors at once.

Token t = (module m, component i). Its embedding is a learned code plus a layer-position and a
module-type embedding; one pre-norm transformer block (full self-attention over every token of
every module, then an MLP) mixes them; per-shape output heads turn each token into the column
P[:, i] (d_out), the row Q[i, :] (d_in) and the singular value lambda_i of its module. Heads are
shared by all modules of one shape, so one matmul per shape generates every factor of that shape.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from senslora.report import layer_and_kind

ATTENTION_HEADS = 4


@dataclasses.dataclass(frozen=True)
class TokenLayout:
    """Where every rank component sits: modules grouped by shape, tokens contiguous per module.

    ``names``/``ranks``/``shapes`` are in token order; ``groups`` holds one
    ``((d_out, d_in), first token, last token + 1, module indices)`` per distinct shape.
    """

    names: tuple[str, ...]
    ranks: tuple[int, ...]
    shapes: tuple[tuple[int, int], ...]
    layers: tuple[int, ...]
    types: tuple[int, ...]
    groups: tuple[tuple[tuple[int, int], int, int, tuple[int, ...]], ...]

    @property
    def num_tokens(self) -> int:
        return sum(self.ranks)

    def token_index(self, values: tuple[int, ...]) -> torch.Tensor:
        """Per-module ``values`` repeated over that module's tokens: (num_tokens,)."""
        return torch.repeat_interleave(torch.tensor(values), torch.tensor(self.ranks))


def token_layout(ranks: dict[str, int], shapes: dict[str, tuple[int, int]]) -> TokenLayout:
    """Layout of ``{module: rank}`` with ``{module: (d_out, d_in)}``; rank-0 modules are dropped.

    The layer and the type come from `senslora.report.layer_and_kind`
    (``encoder.layer.3.attention.self.query`` -> layer 3, type ``attention.self.query``; layer 0
    for a name without a layer index).
    """
    kept = [n for n in ranks if ranks[n] > 0]
    if not kept:
        raise ValueError("every module has rank 0: there is nothing to generate")
    distinct = list(dict.fromkeys(shapes[n] for n in kept))
    names = sorted(kept, key=lambda n: distinct.index(shapes[n]))  # stable within a shape
    kinds = list(dict.fromkeys(layer_and_kind(n)[1] for n in names))
    starts, groups, token = {}, [], 0
    for name in names:
        starts[name] = token
        token += ranks[name]
    for shape in distinct:
        members = tuple(i for i, n in enumerate(names) if shapes[n] == shape)
        first, last = names[members[0]], names[members[-1]]
        groups.append((shape, starts[first], starts[last] + ranks[last], members))
    return TokenLayout(
        names=tuple(names),
        ranks=tuple(ranks[n] for n in names),
        shapes=tuple(shapes[n] for n in names),
        layers=tuple(layer_and_kind(n)[0] or 0 for n in names),
        types=tuple(kinds.index(layer_and_kind(n)[1]) for n in names),
        groups=tuple(groups),
    )


class HyperNetwork(nn.Module):
    """Generates (P columns, Q rows) per shape group and lambda per token, all tokens at once.

    ``residual`` adds a free, zero-initialised per-token residual to the generated P columns and
    Q rows (lambda is always purely generated): AdaLoRA's expressivity at ~1.7x its parameters.
    """

    def __init__(self, layout: TokenLayout, width: int = 32, residual: bool = True) -> None:
        super().__init__()
        if width % ATTENTION_HEADS:
            raise ValueError(f"width must be a multiple of {ATTENTION_HEADS}, got {width}")
        tokens = layout.num_tokens
        self.register_buffer("token_layer", layout.token_index(layout.layers), persistent=False)
        self.register_buffer("token_type", layout.token_index(layout.types), persistent=False)
        self.spans = [(start, end) for _, start, end, _ in layout.groups]
        self.code = nn.Parameter(torch.randn(tokens, width))
        self.layer_embedding = nn.Embedding(max(layout.layers) + 1, width)
        self.type_embedding = nn.Embedding(max(layout.types) + 1, width)
        self.norm_attention = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.attention_out = nn.Linear(width, width)
        self.norm_mlp = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width)
        )
        self.norm_out = nn.LayerNorm(width)
        self.p_heads = nn.ModuleList(_head(width, shape[0]) for shape, *_ in layout.groups)
        self.q_heads = nn.ModuleList(_head(width, shape[1]) for shape, *_ in layout.groups)
        self.lambda_head = nn.Linear(width, 1)
        nn.init.zeros_(self.lambda_head.weight)  # lambda = 0 at the start, as AdaLoRA's E
        nn.init.zeros_(self.lambda_head.bias)
        self.p_residual = nn.ParameterList()
        self.q_residual = nn.ParameterList()
        if residual:
            for (d_out, d_in), start, end, _ in layout.groups:
                self.p_residual.append(nn.Parameter(torch.zeros(end - start, d_out)))
                self.q_residual.append(nn.Parameter(torch.zeros(end - start, d_in)))

    def embed(self) -> torch.Tensor:
        """Token features after the attention block: (tokens, width)."""
        x = (
            self.code
            + self.layer_embedding(self.token_layer)
            + self.type_embedding(self.token_type)
        )
        h = self.norm_attention(x)
        q, k, v = self.qkv(h).chunk(3, dim=-1)
        # (T, width) -> (heads, T, width / heads): one sequence of every token
        q, k, v = (t.unflatten(-1, (ATTENTION_HEADS, -1)).transpose(0, 1) for t in (q, k, v))
        attended = F.scaled_dot_product_attention(q, k, v).transpose(0, 1).flatten(-2)
        x = x + self.attention_out(attended)
        x = x + self.mlp(self.norm_mlp(x))
        return self.norm_out(x)

    def forward(self) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
        """``p_columns[g]``: (T_g, d_out), ``q_rows[g]``: (T_g, d_in) per shape group g, and
        ``lambdas``: (T,) in token order."""
        z = self.embed()
        p_columns, q_rows = [], []
        for g, (start, end) in enumerate(self.spans):
            p, q = self.p_heads[g](z[start:end]), self.q_heads[g](z[start:end])
            if len(self.p_residual):
                p, q = p + self.p_residual[g], q + self.q_residual[g]
            p_columns.append(p)
            q_rows.append(q)
        return p_columns, q_rows, self.lambda_head(z).squeeze(-1)


def _head(width: int, size: int) -> nn.Linear:
    """Outputs of entry-variance 1/size: unit-norm generated vectors from layer-normed tokens."""
    head = nn.Linear(width, size)
    nn.init.normal_(head.weight, std=(width * size) ** -0.5)
    nn.init.zeros_(head.bias)
    return head
