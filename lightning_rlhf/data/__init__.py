from lightning_rlhf.data.sft import SFTDataModule

__all__ = ["SFTDataModule"]
