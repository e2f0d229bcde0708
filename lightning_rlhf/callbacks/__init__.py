from lightning_rlhf.callbacks.advantage_norm import AdvantageNormalization
from lightning_rlhf.callbacks.ema_reference import EMAReferenceUpdate
from lightning_rlhf.callbacks.hf_export import HFExport
from lightning_rlhf.callbacks.progress import RLHFProgressBar
from lightning_rlhf.callbacks.reward_curve import RewardCurve
from lightning_rlhf.callbacks.sample_table import SampleTable

__all__ = [
    "AdvantageNormalization",
    "EMAReferenceUpdate",
    "HFExport",
    "RLHFProgressBar",
    "RewardCurve",
    "SampleTable",
]
