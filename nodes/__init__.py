"""ComfyUI nodes: thin wrappers over core/, one file per technique, a folder per family of several."""
from .compose.custom_diffusion import MergeCustomDiffusion, TrainCustomDiffusion
from .compose.cut_mix import TrainConceptsTogether
from .compose.freecustom import FreeCustom
from .compose.regions import ApplyRegions, ConceptRegion
from .compose.t2i_zero import T2IZeroCorrection, T2IZeroNMS
from .erase.closed_form import EraseConceptClosedForm
from .erase.leace import EraseFromConditioning
from .erase.sliders import ApplySlider, TrainConceptSlider, TrainEsdEraser
from .erase.steering import SteerAwayFromConcept
from .extract import ApplyConcepts, ExtractMasks, LearnConcepts, LoadConcepts, SaveConcepts
from .inspect import AttentionHeatmaps, RecordAttention, RecordConceptAttention
from .learn import ApplyResiduals, LoadResiduals, SaveResiduals, TrainPersonalizedResiduals
from .localize import ApplyResidualsLocalized

NODES = [TrainPersonalizedResiduals, LoadResiduals, SaveResiduals, ApplyResiduals, ApplyResidualsLocalized,
         RecordAttention, RecordConceptAttention, AttentionHeatmaps, ExtractMasks, LearnConcepts, ApplyConcepts,
         SaveConcepts, LoadConcepts,
         ConceptRegion, ApplyRegions, TrainConceptsTogether,
         EraseConceptClosedForm, EraseFromConditioning, SteerAwayFromConcept, TrainConceptSlider, TrainEsdEraser,
         ApplySlider,
         TrainCustomDiffusion, MergeCustomDiffusion, FreeCustom, T2IZeroCorrection, T2IZeroNMS]
