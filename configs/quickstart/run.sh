#!/usr/bin/env bash
# The quickstart pipeline through the CLI and the stage configs (what `lightning-rlhf quickstart` does in
# Python), run from the repository root: testbed -> SFT -> reward model -> DPO, DPO-Iter, plain PPO and PPO with the
# paper's recipe; models in runs/testbed/. Extra arguments go to every fit (e.g. --trainer.max_steps 4).
set -euo pipefail
lightning-rlhf testbed --out runs/testbed
lightning-rlhf fit --config configs/sft/testbed.yaml "$@"
lightning-rlhf fit --config configs/reward/testbed.yaml "$@"
lightning-rlhf fit --config configs/dpo/testbed.yaml "$@"
lightning-rlhf fit --config configs/iterative_dpo/testbed.yaml "$@"
lightning-rlhf fit --config configs/ppo/testbed.yaml "$@"
lightning-rlhf fit --config configs/ppo/paper.yaml "$@"
