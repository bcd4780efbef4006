"""senslora: per-module LoRA ranks from second-order sensitivity (Sensitivity-LoRA).

One call, peft style (any iterable of batches; hooks for custom forwards):

peft_model = senslora.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8), dataloader)

or the pieces:

stats = senslora.collect_statistics(model, batches)           # curvature per module
alloc = senslora.allocate_ranks(stats, senslora.AllocationConfig(avg_rank=4),
                                backbone=senslora.backbone_prefix(model))
lora_config = alloc.to_lora_config(base=peft.LoraConfig(lora_alpha=8, r=4))  # portable keys
"""

from importlib.metadata import PackageNotFoundError, version

from senslora.adapter import compute_allocation, get_peft_model
from senslora.allocation import Allocation, allocate_ranks
from senslora.config import AllocationConfig
from senslora.estimators import collect_statistics
from senslora.peft_bridge import apply_allocation, backbone_prefix, verify_ranks
from senslora.serialization import load_allocation
from senslora.stats import ModuleStats

try:
    __version__ = version("senslora")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0"

__all__ = [
    "Allocation",
    "AllocationConfig",
    "ModuleStats",
    "__version__",
    "allocate_ranks",
    "apply_allocation",
    "backbone_prefix",
    "collect_statistics",
    "compute_allocation",
    "get_peft_model",
    "load_allocation",
    "verify_ranks",
]
