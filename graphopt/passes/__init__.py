"""Passes (one per file), the pass contract, the manager, instruments and presets."""
from .activation_quantization import ActivationQuantization
from .adaptive_ffn_skipping import AdaptiveFFNSkipping
from .base import EXACT, NoOptions, Pass, PassContext, PassResult, Tolerance
from .channel_pruning import ChannelPermutation, ChannelPruning
from .constant_folding import ConstantFolding
from .dead_code import DeadCodeElimination
from .expert_pruning import ExpertPruning
from .ffn_fusion import FFNFusion
from .head_pruning import AttentionHeadPruning
from .horizontal_fusion import HorizontalFusion
from .instruments import DumpInstrument, Instrument, PrintOnChangeInstrument, VerifyInstrument
from .layer_skipping import LayerSkipping
from .manager import PassManager, PassRecord, PipelineResult
from .mixed_precision import MixedPrecisionQuantization
from .presets import PRESETS, preset
from .weight_quantization import WeightQuantization

__all__ = [
    "EXACT", "NoOptions", "Pass", "PassContext", "PassResult", "Tolerance", "ConstantFolding",
    "DeadCodeElimination", "HorizontalFusion", "DumpInstrument", "Instrument",
    "PrintOnChangeInstrument", "VerifyInstrument", "PassManager", "PassRecord", "PipelineResult",
    "PRESETS", "preset", "WeightQuantization", "MixedPrecisionQuantization", "ActivationQuantization",
    "ChannelPruning", "ChannelPermutation", "LayerSkipping", "FFNFusion", "AdaptiveFFNSkipping",
    "AttentionHeadPruning", "ExpertPruning",
]
