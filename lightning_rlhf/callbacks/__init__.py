from lightning_rlhf.callbacks.hf_export import HFExport

__all__ = ["HFExport"]
