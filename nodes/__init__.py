"""ComfyUI nodes: thin wrappers over core/, one file per technique family."""
from .compose import ApplyRegions, ConceptRegion, TrainConceptsTogether
from .compose_extra import (
                    FreeCustom,
                    MergeCustomDiffusion,
                    T2IZeroCorrection,
                    T2IZeroNMS,
                    TrainCustomDiffusion,
)
from .erase import (
                    ApplySlider,
                    EraseConceptClosedForm,
                    EraseFromConditioning,
                    SteerAwayFromConcept,
                    TrainConceptSlider,
                    TrainEsdEraser,
)
from .extract import ApplyConcepts, ExtractMasks, LearnConcepts, LoadConcepts, SaveConcepts
from .inspect import AttentionHeatmaps, RecordAttention
from .learn import ApplyResiduals, LoadResiduals, SaveResiduals, TrainPersonalizedResiduals
from .localize import ApplyResidualsLocalized

NODES = [TrainPersonalizedResiduals, LoadResiduals, SaveResiduals, ApplyResiduals, ApplyResidualsLocalized,
         RecordAttention, AttentionHeatmaps, ExtractMasks, LearnConcepts, ApplyConcepts, SaveConcepts, LoadConcepts,
         ConceptRegion, ApplyRegions, TrainConceptsTogether,
         EraseConceptClosedForm, EraseFromConditioning, SteerAwayFromConcept, TrainConceptSlider, TrainEsdEraser,
         ApplySlider,
         TrainCustomDiffusion, MergeCustomDiffusion, FreeCustom, T2IZeroCorrection, T2IZeroNMS]
