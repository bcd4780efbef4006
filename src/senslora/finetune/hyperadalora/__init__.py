"""HyperAdaLoRA: AdaLoRA whose factors P, Lambda, Q come from an attention hypernetwork."""

from senslora.finetune.hyperadalora.adapter import (
    HyperAdaLora,
    HyperAdaLoraCallback,
    find_controller,
    initial_rank,
    install,
    materialise,
    scale_ranks,
)
from senslora.finetune.hyperadalora.hypernet import HyperNetwork, TokenLayout, token_layout

__all__ = [
    "HyperAdaLora",
    "HyperAdaLoraCallback",
    "HyperNetwork",
    "TokenLayout",
    "find_controller",
    "initial_rank",
    "install",
    "materialise",
    "scale_ranks",
    "token_layout",
]
