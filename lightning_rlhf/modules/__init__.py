from lightning_rlhf.modules.dpo import DPOModule
from lightning_rlhf.modules.iterative_dpo import IterativeDPOModule
from lightning_rlhf.modules.ppo import PPOModule
from lightning_rlhf.modules.reward import RewardModule
from lightning_rlhf.modules.sft import SFTModule

__all__ = ["DPOModule", "IterativeDPOModule", "PPOModule", "RewardModule", "SFTModule"]
