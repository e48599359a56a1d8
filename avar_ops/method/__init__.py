"""Method layer: the AVAR statistics over attention masses (VAS, the AGTO losses, the VARS reward) and the
training-free intervention (per-layer bias / logit-scale tables, and generation under them)."""

from avar_ops.method.intervention import (
    MODES,
    Intervention,
    InterventionTables,
    apply,
    generate,
    intervened,
    patch_tables,
    reweight_probabilities,
)
from avar_ops.method.metrics import (
    VISUAL_REWARDS,
    AGTOLosses,
    Reduction,
    VASResult,
    agto_losses,
    vas,
    visual_reward,
    visual_token_ratios,
)

__all__ = [
    "MODES",
    "Intervention",
    "InterventionTables",
    "apply",
    "generate",
    "intervened",
    "patch_tables",
    "reweight_probabilities",
    "AGTOLosses",
    "Reduction",
    "VASResult",
    "agto_losses",
    "vas",
    "visual_reward",
    "visual_token_ratios",
    "VISUAL_REWARDS",
]
