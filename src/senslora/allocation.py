"""Statistics -> metrics -> scores -> ranks: the `Allocation` a user turns into a LoraConfig."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import torch

from senslora import metrics
from senslora.config import AllocationConfig
from senslora.curvature import with_curvature
from senslora.rank_schemes import progressive_rank_allocation, scaled_rank_allocation
from senslora.stats import ModuleStats

if TYPE_CHECKING:  # pragma: no cover
    import peft
    from torch import nn

METRIC_KEYS = ("trace", "top_k_mean", "effective_rank", "s_global", "s_local", "theta")


@dataclass
class Allocation:
    """Per-module LoRA ranks with the metrics and provenance behind them.

    Attributes:
        ranks: ``{full module name: rank}``; rank 0 means the module gets no adapter.
        shapes: ``{full module name: (d_out, d_in)}``.
        metrics: ``{full module name: {trace, top_k_mean, effective_rank, s_global, s_local,
            theta}}``.
        weights: the combination weights beta1, beta2, gamma1, gamma2.
        config: the AllocationConfig used.
        provenance: model, calibration source, tokens, estimator, package version, time.
        backbone: the dotted path of the backbone in the measured model (``"bert"`` for
            ``BertForSequenceClassification``, ``""`` for ``BertModel``; see
            `senslora.peft_bridge.backbone_prefix`). The LoraConfig names modules relative to
            it, so that one allocation applies to every model built on that backbone.
    """

    ranks: dict[str, int]
    shapes: dict[str, tuple[int, int]]
    metrics: dict[str, dict[str, float]]
    weights: dict[str, float]
    config: AllocationConfig
    provenance: dict[str, Any] = field(default_factory=dict)
    backbone: str = ""

    @property
    def total_rank(self) -> int:
        return sum(self.ranks.values())

    @property
    def num_parameters(self) -> int:
        """Trainable LoRA parameters: a rank of a d_out x d_in matrix costs d_out + d_in."""
        return sum(r * sum(self.shapes[name]) for name, r in self.ranks.items())

    def uniform_parameters(self, rank: int | None = None) -> int:
        """Trainable parameters of uniform LoRA with ``rank`` (default: the average rank)."""
        rank = self.config.avg_rank if rank is None else rank
        return sum(rank * (d_out + d_in) for d_out, d_in in self.shapes.values())

    def relative_ranks(self) -> dict[str, int]:
        """``{module name relative to the backbone: rank}``: the keys of the LoraConfig."""
        from senslora.peft_bridge import relative_name

        relative = {relative_name(name, self.backbone): r for name, r in self.ranks.items()}
        if len(relative) != len(self.ranks):
            raise ValueError(
                f"two modules have the same name relative to the backbone {self.backbone!r}"
            )
        return relative

    def with_backbone(self, backbone: str) -> Allocation:
        """A copy that names ``backbone`` as the measured model's backbone, e.g. ``"bert"`` for
        an allocation file that holds full ``bert.encoder...`` names but no backbone."""
        if not isinstance(backbone, str):
            raise ValueError(f"expected the backbone as a dotted module path, got {backbone!r}")
        return replace(self, backbone=backbone)

    def to_lora_config(
        self, base: peft.LoraConfig | None = None, alpha_policy: str = "scale"
    ) -> peft.LoraConfig:
        """A peft LoraConfig with one ``rank_pattern``/``alpha_pattern`` key per module, named
        relative to the backbone and matched by peft as a suffix (see `senslora.peft_bridge`)."""
        from senslora.peft_bridge import build_lora_config

        return build_lora_config(self, base, alpha_policy=alpha_policy)

    def check_model(self, model: nn.Module) -> None:
        """Refuse a model in which a module of this allocation (named relative to the backbone)
        matches no module, several, or one of another shape."""
        from senslora.serialization import check_model_matches

        check_model_matches(self, model)

    def save(self, path: str, *, alphas: Mapping[str, float] | None = None) -> None:
        """Write ``allocation.json`` atomically (see `senslora.serialization`)."""
        from senslora.serialization import save_allocation

        save_allocation(self, path, alphas=alphas)


def module_metrics(
    stats: Mapping[str, ModuleStats], config: AllocationConfig
) -> dict[str, dict[str, float]]:
    """Trace (eq. 8), Top-k mean (eq. 9) and effective rank (eq. 10) of every module.

    With the diagonal spectrum, the modules whose column values have one shape (length and
    multiplicity) are done together (`metrics.spectrum_metrics_rows`); anything else module by
    module. With ``curvature="inverse"`` the column values are first replaced by the curvature
    after compensation (`senslora.curvature.inverse_curvature`).
    """
    stats = _column_values_on_cpu(with_curvature(stats, config.curvature))
    table = _column_metrics_by_shape(stats, config) if config.spectrum == "diagonal" else {}
    for name, s in stats.items():
        if name in table:
            continue
        values, multiplicity = s.spectrum("diagonal")
        values = metrics.make_nonnegative(values, config.negative)
        k = metrics.top_k_count(s.num_entries, config.top_k_fraction)
        alpha = config.effective_rank_threshold
        if config.spectrum == "eigenvalues":
            er_values, er_multiplicity = s.spectrum("eigenvalues")
            trace = metrics.trace(values, multiplicity)
            top_k_mean = metrics.top_k_mean(values, multiplicity, k=k)
            effective_rank = metrics.effective_rank(er_values, er_multiplicity, alpha=alpha)
        else:  # one validation and one sort per matrix
            trace, top_k_mean, effective_rank = metrics.spectrum_metrics(
                values, multiplicity, k=k, alpha=alpha
            )
        table[name] = {
            "trace": trace,
            "top_k_mean": top_k_mean,
            "effective_rank": float(effective_rank),
        }
    return {name: table[name] for name in stats}


def _column_metrics_by_shape(
    stats: Mapping[str, ModuleStats], config: AllocationConfig
) -> dict[str, dict[str, float]]:
    """The metrics of every module with column values, one NumPy pass per shape."""
    groups: dict[tuple, list[str]] = {}
    for name, s in stats.items():
        if s.column_values is not None:
            key = (s.column_values.numel(), s.shape.out_features, s.column_values.dtype)
            groups.setdefault(key, []).append(name)
    table = {}
    for (_, multiplicity, _), names in groups.items():
        rows = torch.stack([stats[n].column_values.reshape(-1) for n in names])
        rows = metrics.make_nonnegative(rows, config.negative)
        k = metrics.top_k_count(stats[names[0]].num_entries, config.top_k_fraction)
        traces, top_k_means, effective_ranks = metrics.spectrum_metrics_rows(
            rows, multiplicity, k=k, alpha=config.effective_rank_threshold
        )
        for i, name in enumerate(names):
            table[name] = {
                "trace": float(traces[i]),
                "top_k_mean": float(top_k_means[i]),
                "effective_rank": float(effective_ranks[i]),
            }
    return table


def _column_values_on_cpu(stats: Mapping[str, ModuleStats]) -> dict[str, ModuleStats]:
    """The statistics with their column values gathered on the CPU, in one copy per device.

    The metrics run on the CPU; copying module by module would synchronise with the accelerator
    once per module (hundreds of times on a large model) instead of once. (Values already on the
    CPU are gathered too: one small copy, and one code path on every device.)
    """
    stats = dict(stats)
    by_device: dict[torch.device, list[str]] = {}
    for name, s in stats.items():
        if s.column_values is not None:
            by_device.setdefault(s.column_values.device, []).append(name)
    for names in by_device.values():
        flat = torch.cat([stats[n].column_values.reshape(-1) for n in names]).cpu()
        sizes = [stats[n].column_values.numel() for n in names]
        for name, values in zip(names, flat.split(sizes), strict=True):
            stats[name] = replace(stats[name], column_values=values)
    return stats


def allocate_ranks(
    stats: Mapping[str, ModuleStats],
    config: AllocationConfig | None = None,
    *,
    provenance: Mapping[str, Any] | None = None,
    backbone: str = "",
) -> Allocation:
    """Per-module ranks from curvature statistics, under the same budget as uniform LoRA.

    ``backbone``: the backbone's path in the measured model (`senslora.peft_bridge.
    backbone_prefix(model)`); the LoraConfig names modules relative to it.
    """
    config = config or AllocationConfig()
    if not stats:
        raise ValueError("no statistics to allocate from: the target modules were empty")
    names = list(stats)
    table = module_metrics(stats, config)
    scores = metrics.sensitivity_scores(
        [table[n]["trace"] for n in names],
        [table[n]["top_k_mean"] for n in names],
        [table[n]["effective_rank"] for n in names],
        score=config.score,
        weighting=config.weighting,
    )
    for i, name in enumerate(names):
        table[name].update(
            s_global=float(scores.global_[i]),
            s_local=float(scores.local[i]),
            theta=float(scores.theta[i]),
        )
    shapes = {n: (stats[n].shape.out_features, stats[n].shape.in_features) for n in names}
    ranks = integer_ranks([table[n]["theta"] for n in names], [shapes[n] for n in names], config)
    return Allocation(
        ranks=dict(zip(names, ranks, strict=True)),
        shapes=shapes,
        metrics=table,
        weights={k: float(getattr(scores, k)) for k in ("beta1", "beta2", "gamma1", "gamma2")},
        config=config,
        provenance=dict(provenance or {}),
        backbone=backbone,
    )


def integer_ranks(
    theta: list[float], shapes: list[tuple[int, int]], config: AllocationConfig
) -> list[int]:
    """Integer ranks from one weight ``theta`` per matrix of shape (d_out, d_in), under the
    config's scheme, budget and bounds (the last step of `allocate_ranks`)."""
    caps = [min(d_out, d_in) for d_out, d_in in shapes]
    max_ranks = [min(c, config.max_rank) if config.max_rank else c for c in caps]
    min_ranks = [min(config.min_rank, m) for m in max_ranks]
    n = len(theta)
    if config.scheme == "pra":
        if config.budget != "rank":
            raise ValueError("the PRA scheme supports budget='rank' only")
        return progressive_rank_allocation(
            theta,
            config.avg_rank,
            num_categories=config.pra_categories,
            step=config.pra_step,
            min_ranks=min_ranks,
            max_ranks=max_ranks,
        )
    if config.budget == "rank":
        budget = config.avg_rank * n
        if budget < sum(min_ranks) or budget > sum(max_ranks):
            raise ValueError(
                f"rank budget {budget} (avg_rank {config.avg_rank} x {n} matrices) cannot be met "
                f"with ranks between min {sum(min_ranks)} and max {sum(max_ranks)} in total"
            )
        return scaled_rank_allocation(theta, budget, min_ranks=min_ranks, max_ranks=max_ranks)
    costs = [d_out + d_in for d_out, d_in in shapes]
    budget = sum(min(config.avg_rank, cap) * c for cap, c in zip(caps, costs, strict=True))
    needed = sum(m * c for m, c in zip(min_ranks, costs, strict=True))
    if needed > budget:
        raise ValueError(
            f"parameter budget {budget} (uniform LoRA r={config.avg_rank}) is below the {needed} "
            f"parameters that min_rank={config.min_rank} on every matrix costs"
        )
    return scaled_rank_allocation(
        theta, budget, min_ranks=min_ranks, max_ranks=max_ranks, costs=costs
    )
