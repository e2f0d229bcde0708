from lightning_rlhf.modules.sft import SFTModule

__all__ = ["SFTModule"]
