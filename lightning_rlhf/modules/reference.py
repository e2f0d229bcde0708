"""Which model is the reference, how it moves, and whether checkpoints carry it — in one place.

A module's reference is one of:

- a **separate frozen model** (``module.reference``, an ``nn.Module`` submodule: loaded from
  ``reference_model`` or the policy's own folder, never deep-copied, so ZeRO-3 partitions it as it loads);
- the **LoRA policy with its adapters off** (``module.reference`` is None: no second copy is held);
- a **second, frozen LoRA adapter** ``reference`` that DPO-Iter refreshes from the trained one;
- an **EMA of the policy** (a separate model that ``EMAReferenceUpdate`` moves towards the policy) or a
  **refreshed copy** (DPO-Iter's ``refresh_reference``: the same move with η = 1);
- **none** (reference-free losses), or **cached log-probs** (DPO's ``precompute_reference``).

A fixed separate reference is left out of checkpoints (it is reloaded from its folder); a moving one
(``module.reference_in_checkpoint = True``, set by the EMA callback and by DPO-Iter's refresh) is saved.
"""

from __future__ import annotations

import torch
from lightning import LightningModule
from torch import Tensor, nn
from transformers import PreTrainedModel

from lightning_rlhf.lora import AdapterReference, AdaptersDisabled, copy_into_reference_adapter, is_peft_model
from lightning_rlhf.models import LOAD_DTYPE, disable_dropout, freeze, load_causal_lm
from lightning_rlhf.zero import gathered_tensors

_REFERENCE_DROPPED = "lightning_rlhf_reference_dropped"


def load_frozen_reference(
    name_or_path: str, *, trust_remote_code: bool = False, dtype: torch.dtype = LOAD_DTYPE
) -> PreTrainedModel:
    """A separate reference: loaded from disk (never deep-copied from a possibly partitioned policy), eval
    mode, no gradients, no dropout."""
    reference = freeze(load_causal_lm(name_or_path, trust_remote_code=trust_remote_code, dtype=dtype))
    disable_dropout(reference)
    return reference


def reference_model(module: LightningModule):
    """What the module's reference forwards run on: its separate ``reference`` model, or its LoRA policy with
    the refreshed ``reference`` adapter (``module.adapter_refresh``) or with its adapters off; None when
    there is no reference (reference-free, or cached log-probs)."""
    reference = getattr(module, "reference", None)
    if reference is not None:
        return reference
    policy = getattr(module, "policy", None)
    if policy is None or not is_peft_model(policy):
        return None
    return AdapterReference(policy) if getattr(module, "adapter_refresh", False) else AdaptersDisabled(policy)


def moving_tensors(model: nn.Module, *, all_buffers: bool = False) -> list[tuple[str, Tensor]]:
    """Parameters (tied ones once) and floating-point buffers by name (all buffers with ``all_buffers``)."""
    tensors = list(model.named_parameters())
    buffers = model.named_buffers()
    tensors += [(n, b) for n, b in buffers if all_buffers or torch.is_floating_point(b)]
    return tensors


@torch.no_grad()
def move_towards_policy(reference: nn.Module, policy: nn.Module, eta: float) -> None:
    """``reference ← (1 − η) · reference + η · policy``, tensor by tensor, matched by name; η = 1 copies
    (every buffer too). The EMA reference and DPO-Iter's refresh both move the reference through this.

    Low-precision tensors are averaged in float32 and rounded once. Under ZeRO-3 each pair is gathered whole
    for its own update (one tensor pair in memory at a time); rank 0's result is re-partitioned to all ranks.
    """
    copy = eta == 1
    sources = dict(moving_tensors(policy, all_buffers=copy))
    for name, target_tensor in moving_tensors(reference, all_buffers=copy):
        if name not in sources:
            raise KeyError(
                f"the reference has {name!r} but the policy does not: not the policy's architecture"
            )
        with gathered_tensors([target_tensor, sources[name]], modifier_rank=0):
            target = target_tensor.data
            source = sources[name].data.to(device=target.device)
            if copy:
                target.copy_(source)
            elif target.dtype in (torch.float32, torch.float64):
                target.lerp_(source.to(target.dtype), eta)
            else:
                target.copy_(target.float().lerp_(source.float(), eta))


def refresh_reference(module: LightningModule) -> None:
    """Make the reference the current policy: copy it into the separate model, or into the ``reference``
    adapter of a LoRA policy (exact: base + B·A of the policy that sampled the last pairs)."""
    if getattr(module, "reference", None) is not None:
        move_towards_policy(module.reference, module.policy, 1.0)
    elif getattr(module, "adapter_refresh", False):
        copy_into_reference_adapter(module.policy)


def drop_frozen_reference(module: LightningModule, checkpoint: dict) -> None:
    """Leave a fixed reference model out of a checkpoint (it would double its size) and mark that we did.

    Modules whose reference changes during training set ``reference_in_checkpoint = True`` (the
    ``EMAReferenceUpdate`` callback and DPO-Iter's refresh do), and then it is saved like any weight.
    """
    if getattr(module, "reference", None) is None or getattr(module, "reference_in_checkpoint", False):
        return
    state = checkpoint.get("state_dict", {})
    for key in [k for k in state if k.startswith("reference.")]:
        del state[key]
    checkpoint[_REFERENCE_DROPPED] = True


def restore_frozen_reference(module: LightningModule, checkpoint: dict) -> None:
    """Refill a dropped reference from the freshly loaded one (same weights: it was fixed) before loading.

    A DeepSpeed checkpoint has no ``state_dict`` here: the engine saved and loaded every weight itself.
    """
    if (
        checkpoint.get(_REFERENCE_DROPPED)
        and "state_dict" in checkpoint
        and getattr(module, "reference", None) is not None
    ):
        state = checkpoint["state_dict"]
        for key, value in module.reference.state_dict().items():
            state.setdefault(f"reference.{key}", value)
