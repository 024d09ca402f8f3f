"""The project's trainer (backends `transformers` and `vllm`): TRL's GRPOTrainer with the paper's
update scheme, the registered rules of cppo.rules and the run directory of cppo.run.

    run.py           run_training(cfg): one run from a validated run.yaml, resume, final/, DONE
    config.py        CPPOConfig (TRL's GRPOConfig + the method) built from run.yaml
    trainer.py       CPPOTrainer: mu recording, the rule's loss, the step log
    schedule.py      the batch arithmetic of Table 3 (plan_batches)
    checkpoints.py   rotated full checkpoints and model-only snapshots
    diagnostics.py   the per-optimizer-step record of metrics.jsonl
    validation*.py   in-loop Avg@k validation and its schedule
    lmhead.py        fused LM head: sampled-token and top-K log-probs without [T, V] copies
"""
