"""ComfyUI nodes: thin wrappers over core/, one file per technique family."""
from .learn import ApplyResiduals, LoadResiduals, SaveResiduals, TrainPersonalizedResiduals
from .localize import ApplyResidualsLocalized

NODES = [TrainPersonalizedResiduals, LoadResiduals, SaveResiduals, ApplyResiduals, ApplyResidualsLocalized]
