"""Reproduce the findings of "Is DPO Superior to PPO for LLM Alignment?" (Xu et al. 2024) on the testbed.

    python examples/paper_study.py                 # the full study (3 seeds; see docs/paper_study.md)
    python examples/paper_study.py --fast          # a smoke run of a few minutes
    python examples/paper_study.py --jobs 2        # seeds and sweep points in parallel processes

The same as ``lightning-rlhf study``. It writes paper_study.md (tables, mean ± std over seeds),
paper_study.json (every number), curves.png and shift.png into --out (default runs/paper_study). Needs
matplotlib: ``pip install 'lightning-rlhf[study]'``.
"""

from lightning_rlhf.study.main import main

if __name__ == "__main__":
    main()
