"""The paper study on the testbed: every method and PPO ablation, seeds, a shift sweep and Theorem 4.1."""
