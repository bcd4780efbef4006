"""senslora: per-module LoRA ranks from second-order sensitivity (Sensitivity-LoRA).

stats = senslora.collect_statistics(model, batches)           # curvature per module
alloc = senslora.allocate_ranks(stats, senslora.AllocationConfig(avg_rank=4))
lora_config = alloc.to_lora_config(base=peft.LoraConfig(lora_alpha=8, r=4))
"""

from importlib.metadata import PackageNotFoundError, version

from senslora.allocation import Allocation, allocate_ranks
from senslora.config import AllocationConfig
from senslora.estimators import collect_statistics
from senslora.peft_bridge import apply_allocation, verify_ranks
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
    "collect_statistics",
    "load_allocation",
    "verify_ranks",
]
