"""Rerun the experiments of "Is DPO Superior to PPO for LLM Alignment?" (Xu et al. 2024) on both testbeds.

    python examples/paper_study.py --jobs 2        # the full study (docs/paper_study.md): ~30 min, 2 cores
    python examples/paper_study.py --fast          # a smoke run of about a minute
    python examples/paper_study.py --tasks programs --arms ppo_A ppo_B ppo_A_r1 ppo_B_r1   # some arms only

The same as ``lightning-rlhf study``. It writes paper_study.md (the decision rule, then per task the paired
comparisons and every arm's numbers), paper_study.json (every number), curves_<task>.png and shift.png into
--out (default runs/paper_study). Needs matplotlib: ``pip install 'lightning-rlhf[study]'``.
"""

from lightning_rlhf.study.main import main

if __name__ == "__main__":
    main()
