"""lightning_rlhf: reward models, DPO and PPO as PyTorch Lightning modules."""

from lightning_rlhf.callbacks import (
    AdvantageNormalization,
    EMAReferenceUpdate,
    HFExport,
    RewardCurve,
    RLHFProgressBar,
    SampleTable,
)
from lightning_rlhf.console import show_package_logs
from lightning_rlhf.data.loading import DataError
from lightning_rlhf.data.preference import PreferenceDataModule
from lightning_rlhf.data.prompts import PromptDataModule
from lightning_rlhf.data.sft import SFTDataModule
from lightning_rlhf.lora import LoraSettings
from lightning_rlhf.losses import (
    BradleyTerryLoss,
    DPOLoss,
    HingeDPOLoss,
    IPOLoss,
    RobustDPOLoss,
    SigmoidDPOLoss,
)
from lightning_rlhf.modules.dpo import DPOModule
from lightning_rlhf.modules.iterative_dpo import IterativeDPOModule
from lightning_rlhf.modules.ppo import PPOModule
from lightning_rlhf.modules.reward import RewardModule
from lightning_rlhf.modules.sft import SFTModule
from lightning_rlhf.rollout.advantages import GAE, GRPO, RLOO, REINFORCEPlusPlus

__version__ = "0.1.0.dev0"

show_package_logs()  # the package's own lines reach the terminal, as Lightning's do (see console.py)

__all__ = [
    "AdvantageNormalization",
    "BradleyTerryLoss",
    "DataError",
    "DPOLoss",
    "DPOModule",
    "EMAReferenceUpdate",
    "GAE",
    "GRPO",
    "HFExport",
    "REINFORCEPlusPlus",
    "RLHFProgressBar",
    "RLOO",
    "HingeDPOLoss",
    "IPOLoss",
    "IterativeDPOModule",
    "LoraSettings",
    "PPOModule",
    "PreferenceDataModule",
    "PromptDataModule",
    "RewardCurve",
    "RewardModule",
    "RobustDPOLoss",
    "SampleTable",
    "SFTDataModule",
    "SFTModule",
    "SigmoidDPOLoss",
]
