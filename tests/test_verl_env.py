"""The verl backend inside verl 0.9.1 itself (bash .ci/verl: a CPU environment with verl and
this package): the plugin registers through verl's entry point, verl's loss aggregation equals
the restated one, the registered loss called the way verl's ppo_loss calls it equals the
rules (an out-of-tree rule of run.yaml's `imports` included), and the generated overrides
compose into verl's config dataclasses and pass verl's own config checks. Skipped where verl is
not installed (the project's environment)."""

from __future__ import annotations

from pathlib import Path

import pytest

verl = pytest.importorskip("verl")

import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from cppo.backends.verl.loss import (  # noqa: E402
    policy_loss,
    rule_loss,
    verl_agg_loss,
)
from cppo.backends.verl.probe import composed_config as composed  # noqa: E402
from cppo.run.config import method_rule  # noqa: E402

pytestmark = pytest.mark.verl
ROOT = Path(__file__).resolve().parents[1]


def paper_run(method: str = "grpo") -> dict:
    from cppo.pipeline.config import load_config
    from cppo.pipeline.plan import Plan
    from cppo.run.config import validate_run_config

    plan = Plan(load_config(ROOT / "config" / "paper.yaml"))
    return validate_run_config(plan.resolver.run_config("Qwen3-30B-A3B-Base", method, 0))


def test_the_plugin_registers_the_loss_through_verls_entry_point():
    from verl.trainer.ppo.core_algos import get_policy_loss_fn

    assert get_policy_loss_fn("cppo") is policy_loss
    from cppo.backends.verl.plugin import CPPOPolicyLossConfig

    assert "method_file" in CPPOPolicyLossConfig.__dataclass_fields__


@pytest.mark.parametrize(
    "mode", ["token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm", "seq-mean-token-mean"]
)
def test_restated_aggregation_equals_verls(mode):
    from verl.trainer.ppo.core_algos import agg_loss

    g = torch.Generator().manual_seed(0)
    for dp in (1, 4):
        loss = torch.randn(5, 7, generator=g, dtype=torch.float64)
        mask = torch.rand(5, 7, generator=g) < 0.7
        mask[2] = False
        info = {
            "dp_size": dp,
            "batch_num_tokens": 91,
            "global_batch_size": 20,
            "loss_scale_factor": 9,
        }
        if dp == 1:
            info = {"dp_size": 1}
        want = agg_loss(loss, mask, mode, **info)
        got = verl_agg_loss(loss, mask, mode, **info)
        torch.testing.assert_close(got, want.to(got.dtype), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("strategy", ["fsdp", "megatron"])
def test_generated_overrides_compose_into_verls_dataclasses(tmp_path, strategy):
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import omega_conf_to_dataclass, validate_config

    run = paper_run()
    run["verl"]["strategy"] = strategy
    if strategy == "megatron":
        run["verl"].update(tensor_model_parallel_size=2, expert_model_parallel_size=8)
    cfg = composed(run, tmp_path)
    validate_config(
        config=cfg, use_reference_policy=need_reference_policy(cfg), use_critic=need_critic(cfg)
    )
    actor = omega_conf_to_dataclass(cfg.actor_rollout_ref.actor)
    assert type(actor.policy_loss).__name__ == "CPPOPolicyLossConfig"
    assert actor.policy_loss.loss_mode == "cppo"
    assert actor.policy_loss.method_file == str(tmp_path / "method.json")
    assert actor.loss_agg_mode == "seq-mean-token-sum-norm" and actor.loss_scale_factor == 16384
    assert actor.ppo_mini_batch_size == 32 and actor.ppo_epochs == 1
    algo = omega_conf_to_dataclass(cfg.algorithm)
    assert algo.rollout_correction["bypass_mode"] is True and algo.norm_adv_by_std_in_grpo is False
    rollout = omega_conf_to_dataclass(cfg.actor_rollout_ref.rollout)
    assert rollout.n == 16 and rollout.tensor_model_parallel_size == 4
    assert OmegaConf.select(cfg, "trainer.nnodes") == 2


def test_the_registered_loss_called_as_verl_calls_it_equals_the_rules(tmp_path):

    run = paper_run()
    method = {**run["method"], "rule": "dppo", "divergence": "binary_tv", "delta": 0.05}
    for key in ("dual_clip", "eps_low", "eps_high"):
        method.pop(key, None)
    run["method"] = method
    loss, metrics, want, want_metrics = verl_loss_and_rule_loss(run, tmp_path)
    torch.testing.assert_close(loss, want)
    assert metrics == want_metrics and "mask/fraction" in metrics


def verl_loss_and_rule_loss(run: dict, tmp_path: Path):
    """The loss verl's registry returns for `run`, called as ppo_loss calls it, and the rule's
    loss on the same batch."""
    from verl.trainer.ppo.core_algos import get_policy_loss_fn
    from verl.utils.config import omega_conf_to_dataclass

    actor = omega_conf_to_dataclass(composed(run, tmp_path).actor_rollout_ref.actor)
    g = torch.Generator().manual_seed(1)
    B, T = 4, 6
    old = -torch.rand(B, T, generator=g)
    new = (old + 0.3 * torch.randn(B, T, generator=g)).requires_grad_(True)
    adv = torch.randn(B, 1, generator=g).expand(B, T)
    mask = torch.arange(T) < torch.tensor([[6], [3], [5], [1]])
    actor.global_batch_info.update(
        dp_size=2, batch_num_tokens=30, global_batch_size=8, loss_scale_factor=16384
    )
    loss, metrics = get_policy_loss_fn("cppo")(
        old_log_prob=old, log_prob=new, advantages=adv, response_mask=mask,
        loss_agg_mode=actor.loss_agg_mode, config=actor, rollout_is_weights=None,
    )  # fmt: skip
    want, want_metrics = rule_loss(
        method_rule(run), old_log_prob=old, log_prob=new, advantages=adv, response_mask=mask,
        global_batch_info={"dp_size": 2, "batch_num_tokens": 30, "global_batch_size": 8},
    )  # fmt: skip
    return loss, metrics, want, want_metrics


def test_an_out_of_tree_rule_reaches_the_verl_loss(tmp_path, monkeypatch):
    # a baseline added the README's way: one module registering a rule, named in run.yaml's
    # `imports`; the loss imports it in the worker from the method file, nothing else does
    module = "probe_rule_for_verl"
    (tmp_path / f"{module}.py").write_text(
        "import torch\n"
        "from cppo.rules import get_rule, register_rule\n"
        "grpo = get_rule('grpo')\n"
        "@register_rule('probe_verl', params=dict(grpo.params))\n"
        "def probe(batch, cfg):\n"
        "    out = grpo.fn(batch, cfg)\n"
        "    out.metrics['probe/one'] = torch.ones(())\n"
        "    out.per_token_loss = 2.0 * out.per_token_loss\n"
        "    return out\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    from cppo.rules import available_rules

    assert "probe_verl" not in available_rules()
    run = paper_run()
    run["imports"] = [module]
    run["method"] = {**run["method"], "rule": "probe_verl"}
    loss, metrics, want, _ = verl_loss_and_rule_loss(run, tmp_path)
    assert metrics["probe/one"] == 1.0
    run["method"]["rule"] = "grpo"
    (tmp_path / "grpo").mkdir()
    grpo_loss = verl_loss_and_rule_loss(run, tmp_path / "grpo")[0]
    torch.testing.assert_close(loss, 2.0 * grpo_loss)
    torch.testing.assert_close(loss, want)


def test_the_train_command_imports_without_trl():
    import sys

    from cppo.backends.verl import train

    assert callable(train.main) and "trl" not in sys.modules
    # the run contract is cppo.run: the verl environment never imports the TRL trainer package
    assert "cppo.training" not in sys.modules
