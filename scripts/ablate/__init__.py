"""Layer-, head- and o_proj-ablation studies of decoder LLMs with lm-evaluation-harness."""
