"""The keys every train record of metrics.jsonl carries (null where they do not apply), shared
by the project's trainer (cppo.training.diagnostics, which defines them) and the verl backend's
converter (cppo.backends.verl.metrics); it imports nothing, so verl's environment can read it."""

TRAIN_KEYS = (
    "reward/mean",
    "accuracy",
    "length/mean",
    "length/max",
    "truncation_rate",
    "entropy",
    "grad_norm",
    "learning_rate",
    "mask/fraction",
    "mask/token_fraction",
    "mask/prefix_fraction",
    "cppo/delta_b_eff",
    "divergence/mean",
    "ratio/abs_dev_mean",
    "logprob/rel_error",
    "groups/zero_std_fraction",
    "time/step_s",
    "throughput/tokens_per_s",
)
# Contract keys that the rule's own report fills (weighted by eligible tokens over micro-steps).
RULE_KEYS = ("mask/fraction", "mask/token_fraction", "mask/prefix_fraction", "cppo/delta_b_eff")
