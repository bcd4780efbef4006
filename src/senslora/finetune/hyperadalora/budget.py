"""AdaLoRA's rank budget on generated factors: importance scores, budget schedule, top-k mask.

Pure tensor functions and one accumulator; nothing here touches a model (unlike peft's
``RankAllocator.mask_to_budget``). Importance follows AdaLoRA (Zhang et al. 2023, eqs. 8-11):
sensitivity I = |w * dL/dw| per entry, smoothed I_bar = b1 I_bar + (1 - b1) I, uncertainty
U_bar = b2 U_bar + (1 - b2) |I - I_bar|, score s = I_bar * U_bar; a triplet (P column, lambda,
Q row) scores s(lambda) + mean s(P column) + mean s(Q row).
"""

from __future__ import annotations

import torch

BETA1 = 0.85  # peft AdaLoraConfig defaults
BETA2 = 0.85


def budget_at(
    step: int, *, initial: int, target: int, tinit: int, tfinal: int, total_steps: int, delta_t: int
) -> tuple[int, bool]:
    """(total rank budget, whether to re-mask now) after ``step`` optimizer steps: the initial
    budget for ``tinit`` steps, a cubic decrease to ``target``, ``target`` for the last
    ``tfinal`` steps (peft ``RankAllocator.budget_schedule``)."""
    if step <= tinit:
        return initial, False
    if step > total_steps - tfinal:
        return target, True
    remaining = 1 - (step - tinit) / (total_steps - tfinal - tinit)
    return int((initial - target) * remaining**3 + target), step % delta_t == 0


def top_budget_mask(scores: torch.Tensor, budget: int) -> torch.Tensor:
    """1.0 for the ``budget`` highest scores, 0.0 elsewhere: exactly ``budget`` kept."""
    if not 0 <= budget <= scores.numel():
        raise ValueError(f"budget must be in [0, {scores.numel()}], got {budget}")
    mask = torch.zeros_like(scores)
    mask[torch.topk(scores, budget).indices] = 1.0
    return mask


class Importance:
    """Smoothed sensitivity and uncertainty of every entry of the generated factors.

    ``update`` takes ``{key: value}`` and ``{key: accumulated gradient}`` with keys ``lambda``
    (T,), ``p{g}`` (T_g, d_out) and ``q{g}`` (T_g, d_in) per shape group g.
    """

    def __init__(self, beta1: float = BETA1, beta2: float = BETA2) -> None:
        if not (0 < beta1 < 1 and 0 < beta2 < 1):
            raise ValueError(f"beta1 and beta2 must be in (0, 1), got {beta1}, {beta2}")
        self.beta1, self.beta2 = beta1, beta2
        self.smoothed: dict[str, torch.Tensor] = {}
        self.uncertainty: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def update(self, values: dict[str, torch.Tensor], grads: dict[str, torch.Tensor]) -> None:
        for key, grad in grads.items():
            sensitivity = (values[key] * grad).abs().float()
            smoothed = self.smoothed.get(key, torch.zeros_like(sensitivity))
            uncertainty = self.uncertainty.get(key, torch.zeros_like(sensitivity))
            smoothed = self.beta1 * smoothed + (1 - self.beta1) * sensitivity
            self.uncertainty[key] = (
                self.beta2 * uncertainty + (1 - self.beta2) * (sensitivity - smoothed).abs()
            )
            self.smoothed[key] = smoothed

    def score(self, key: str) -> torch.Tensor:
        return self.smoothed[key] * self.uncertainty[key]

    @torch.no_grad()
    def token_scores(self, num_groups: int) -> torch.Tensor:
        """(T,) triplet scores in token order (after at least one ``update``)."""
        if "lambda" not in self.smoothed:
            raise ValueError("no importance yet: call update() after a backward pass first")
        vectors = torch.cat(
            [
                self.score(f"p{g}").mean(dim=1) + self.score(f"q{g}").mean(dim=1)
                for g in range(num_groups)
            ]
        )
        return self.score("lambda") + vectors
