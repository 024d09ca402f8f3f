"""The trainer: TRL's GRPOTrainer with the paper's update scheme, rules from cppo.rules and diagnostics.

from cppo.training import CPPOTrainer, CPPOConfig, plan_batches, load_run_config, run_training
"""

from cppo.training.runconfig import RunConfigError, load_run_config, validate_run_config
from cppo.training.schedule import BatchPlan, plan_batches


def __getattr__(name: str):
    # TRL is imported on first use only: run.yaml's loader also serves environments without
    # it (the verl backend's)
    if name in ("CPPOConfig", "grpo_config_from_run"):
        from cppo.training import config

        return getattr(config, name)
    if name == "CPPOTrainer":
        from cppo.training.trainer import CPPOTrainer

        return CPPOTrainer
    if name == "run_training":
        from cppo.training.run import run_training

        return run_training
    raise AttributeError(name)


__all__ = [
    "BatchPlan",
    "CPPOConfig",
    "CPPOTrainer",
    "RunConfigError",
    "grpo_config_from_run",
    "load_run_config",
    "plan_batches",
    "run_training",
    "validate_run_config",
]
