"""A test-only DeepSpeed strategy on CPU processes joined by gloo (the stock DeepSpeedStrategy needs CUDA).

It changes only where the strategy lives, not what DeepSpeed does: ZeRO partitioning, the engine's optimizer
step, gradient accumulation and checkpoint files are DeepSpeed's own. Recipe in DEVELOPERS.md.
"""

from __future__ import annotations

import os
import tempfile

import torch
from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy

# DeepSpeed compiles a small CPU op (the Adam/Lion helpers) on first use; keep it out of the home folder and
# reuse it between tests of one session.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(tempfile.gettempdir(), "lightning_rlhf_torch_ext"))
os.environ.setdefault("DS_ACCELERATOR", "cpu")


def _reduce_through_gloo() -> None:
    """Keep DeepSpeed from building its CPU shared-memory all-reduce op (``deepspeed_shm_comm``).

    DeepSpeed compiles that C++ extension the first time a CPU process group starts (54-56 s on 2 cores,
    measured, once per CI run and again whenever two fresh processes race for it); without it collectives
    go through the gloo group the ranks already share. It is a transport only: ZeRO's partitioning,
    gathering and reduction code is the same either way.
    """
    try:
        import deepspeed.ops
    except ImportError:
        return
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


_reduce_through_gloo()


class CPUDeepSpeedStrategy(DeepSpeedStrategy):
    strategy_name = "deepspeed_cpu_test"

    def __init__(self, **kwargs) -> None:
        kwargs.setdefault("process_group_backend", "gloo")
        super().__init__(**kwargs)

    def setup_environment(self) -> None:
        DDPStrategy.setup_environment(self)

    def setup_distributed(self) -> None:
        reset_seed()
        self.set_world_ranks()
        self._init_deepspeed_distributed()

    @property
    def root_device(self) -> torch.device:
        return torch.device("cpu", 0)


def zero_config(stage: int, **overrides) -> dict:
    """A small DeepSpeed config: fp32, no optimizer in the config (the module's AdamW is used)."""
    config = {
        # reduce_bucket_size: DeepSpeed's default is 5e8 elements, a 2 GB fp32 buffer allocated again on every
        # micro-step once gradients are contiguous (ZeRO-Offload makes them so); 1e7 still holds every test
        # model's gradients in one bucket, so what is reduced, and how, is unchanged.
        "zero_optimization": {
            "stage": stage,
            "overlap_comm": False,
            "contiguous_gradients": False,
            "reduce_bucket_size": 10_000_000,
        },
        "zero_allow_untested_optimizer": True,
        "train_micro_batch_size_per_gpu": 1,
        "gradient_clipping": 0.0,
        "wall_clock_breakdown": False,
    }
    if stage == 3:
        config["zero_optimization"].update(
            stage3_param_persistence_threshold=0,
            stage3_prefetch_bucket_size=0,
            stage3_max_live_parameters=1e9,
        )
    config.update(overrides)
    return config
