from lightning_rlhf.data.loading import DataError
from lightning_rlhf.data.preference import PreferenceDataModule
from lightning_rlhf.data.prompts import PromptDataModule
from lightning_rlhf.data.sft import SFTDataModule

__all__ = ["DataError", "PreferenceDataModule", "PromptDataModule", "SFTDataModule"]
