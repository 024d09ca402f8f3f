"""Rule registry: ``register_rule(name)``, ``get_rule(name)``, ``available_rules()``.

A rule is registered with a parameter schema; calling it validates the config (unknown keys,
wrong types and out-of-range values raise :class:`RuleConfigError` naming the key) and fills
in defaults before the rule body sees it. Every rule accepts the common keys

* ``rule``: the registry name (optional; must match when given),
* ``loss_agg_mode`` / ``horizon``: how the caller should aggregate the per-token loss
  (``horizon``: the constant of ``seq-mean-token-sum-norm``, the padded response length; CPPO's
  padded position horizon reads it too),
* ``log_ratio_clamp``: clamp of log(pi/mu) before exp (default 20, None disables),

and rules that read a divergence also accept ``divergence`` (kind), ``topk`` and
``sampled_token``, which tell the caller what to compute into ``RuleBatch.divergence``.

A caller binds a rule to its config once (``get_rule(name).bind(cfg)``) and asks the bound rule
what it needs (``.divergence``, ``.needs_topk``, ``.draws_random``) before calling it per batch.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch

from cppo.divergence import DIVERGENCE_KINDS, SAMPLED_TOKEN_MODES, is_topk
from cppo.rules.aggregation import AGGREGATION_MODES
from cppo.rules.base import RuleBatch, RuleOutput

__all__ = [
    "Param",
    "BoundRule",
    "Rule",
    "RuleConfigError",
    "RuleContractError",
    "UnknownRuleError",
    "register_rule",
    "get_rule",
    "available_rules",
    "resolve_config",
    "COMMON_PARAMS",
    "RATIO_CAP",
    "divergence_params",
]


class UnknownRuleError(ValueError):
    """Raised by get_rule for a name that is not registered."""


class RuleConfigError(ValueError):
    """Raised when a rule config has an unknown key or a bad value."""


class RuleContractError(ValueError):
    """Raised when a rule's output breaks the contract of RuleOutput (see check_output)."""


@dataclass(frozen=True)
class Param:
    """One config parameter: default, accepted type, optional choices / range check."""

    default: Any
    kind: type
    optional: bool = False  # None is a valid value
    choices: tuple | None = None
    check: Callable[[Any], bool] | None = None
    requirement: str = ""  # human-readable form of `check`
    help: str = ""

    def validate(self, rule: str, key: str, value: Any) -> Any:
        where = f"rule {rule!r}: config key {key!r}"
        if value is None:
            if self.optional:
                return None
            raise RuleConfigError(f"{where} must not be None")
        if self.kind is bool:
            if not isinstance(value, bool):
                raise RuleConfigError(f"{where} must be true/false, got {value!r}")
        elif self.kind is float:
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise RuleConfigError(f"{where} must be a number, got {value!r}")
            value = float(value)
        elif self.kind is int:
            if isinstance(value, bool) or not isinstance(value, int):
                raise RuleConfigError(f"{where} must be an integer, got {value!r}")
        elif not isinstance(value, self.kind):
            raise RuleConfigError(f"{where} must be a {self.kind.__name__}, got {value!r}")
        if self.choices is not None and value not in self.choices:
            raise RuleConfigError(
                f"{where} must be one of {', '.join(map(str, self.choices))}; got {value!r}"
            )
        if self.check is not None and not self.check(value):
            raise RuleConfigError(f"{where} must satisfy {self.requirement}; got {value!r}")
        return value


def _positive(x: float) -> bool:
    return x > 0


COMMON_PARAMS: dict[str, Param] = {
    "rule": Param(None, str, optional=True, help="registry name"),
    "loss_agg_mode": Param("token-mean", str, choices=AGGREGATION_MODES),
    "horizon": Param(None, int, optional=True, check=_positive, requirement="> 0"),
    "log_ratio_clamp": Param(20.0, float, optional=True, check=_positive, requirement="> 0"),
}


# The truncated importance ratio of the rules whose surrogate is rho * A (see cppo.rules.base):
# null = off (UniRL's CPPO), 20 = verl PR #6731's CPPO (actor.clip_ratio_c).
RATIO_CAP = Param(
    None,
    float,
    optional=True,
    check=_positive,
    requirement="> 0",
    help="gradient coefficient min(rho, C) instead of rho; null = off",
)


def divergence_params(kind: str, topk: int = 20) -> dict[str, Param]:
    """Schema of the keys that say which divergence the caller must compute."""
    return {
        "divergence": Param(kind, str, choices=DIVERGENCE_KINDS),
        "topk": Param(topk, int, check=_positive, requirement="> 0"),
        "sampled_token": Param("extra", str, choices=SAMPLED_TOKEN_MODES),
    }


RuleFn = Callable[[RuleBatch, dict[str, Any]], RuleOutput]


class Rule:
    """A registered rule: ``rule.bind(cfg)(batch) -> RuleOutput``, or ``rule(batch, cfg)``.

    ``binding`` names the diagnostic that says how much the rule binds (a share in [0, 1] of
    terms, or of responses for a sequence-level rule; None for a rule that never binds): the
    binding table and figure read it. ``draws_random`` says, from the resolved config, whether
    the rule reads ``RuleBatch.seed`` (a caller must then vary the seed per step).
    """

    def __init__(
        self,
        name: str,
        fn: RuleFn,
        params: Mapping[str, Param],
        needs_divergence: bool,
        check: Callable[[dict[str, Any]], None] | None = None,
        binding: str | None = "mask/fraction",
        draws_random: Callable[[Mapping[str, Any]], bool] | None = None,
    ):
        self.name = name
        self.fn = fn
        self.params = dict(params)
        self.needs_divergence = needs_divergence
        self.binding = binding
        self._check = check
        self._draws_random = draws_random
        self.__doc__ = fn.__doc__
        self.__wrapped__ = fn

    def defaults(self) -> dict[str, Any]:
        """The resolved default config (derived defaults filled in)."""
        return self.resolve({})

    def resolve(self, cfg: Mapping[str, Any] | None) -> dict[str, Any]:
        """Validate ``cfg`` and return it with defaults filled in."""
        cfg = dict(cfg or {})
        for key in cfg:
            if key not in self.params:
                close = difflib.get_close_matches(key, self.params, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise RuleConfigError(
                    f"rule {self.name!r}: unknown config key {key!r}{hint}; valid keys: "
                    f"{', '.join(sorted(self.params))}"
                )
        if cfg.get("rule") not in (None, self.name):
            raise RuleConfigError(
                f"rule {self.name!r}: config key 'rule' is {cfg['rule']!r}, expected {self.name!r}"
            )
        out = {
            k: p.validate(self.name, k, cfg.get(k, p.default))
            for k, p in self.params.items()
            if k != "rule"
        }
        if self._check is not None:
            self._check(out)
        return out

    def bind(self, cfg: Mapping[str, Any] | None = None) -> BoundRule:
        """The rule with ``cfg`` validated and resolved once (see BoundRule)."""
        resolved = self.resolve(cfg)
        random = self._draws_random is not None and bool(self._draws_random(resolved))
        return BoundRule(self, MappingProxyType(resolved), random)

    def __call__(self, batch: RuleBatch, cfg: Mapping[str, Any] | None = None) -> RuleOutput:
        return self.bind(cfg)(batch)

    def __repr__(self) -> str:
        return f"Rule({self.name!r})"


def check_output(name: str, out: Any, batch: RuleBatch, *, values: bool) -> None:
    """The contract of a rule's output, checked on every call (types and shapes: no device sync)
    and, with ``values``, on the values (one sync; the first call of a bound rule):

    * ``per_token_loss``: a floating tensor of the batch's [B, T] shape that carries the
      gradient of ``batch.logp`` (when that requires grad), finite on every real token whose
      inputs are finite (a NaN log-prob from the model is the model's, not the rule's);
    * ``keep``: a bool tensor of that shape; ``weight``: a floating tensor of that shape,
      finite where the loss must be;
    * ``metrics``: a mapping of names to one-element tensors or numbers.

    Raises RuleContractError naming the rule and the field.
    """

    def fail(field_name: str, problem: str) -> None:
        raise RuleContractError(f"rule {name!r}: RuleOutput.{field_name} {problem}")

    if not isinstance(out, RuleOutput):
        raise RuleContractError(
            f"rule {name!r} returned {type(out).__name__}, expected cppo.rules.RuleOutput"
        )
    shape = tuple(batch.logp.shape)
    for field_name, floating in (("per_token_loss", True), ("keep", False), ("weight", True)):
        t = getattr(out, field_name)
        if not torch.is_tensor(t):
            fail(field_name, f"must be a tensor of shape {shape}, got {type(t).__name__}")
        if tuple(t.shape) != shape:
            fail(field_name, f"must have the batch's shape {shape}, got {tuple(t.shape)}")
        if floating and not t.is_floating_point():
            fail(field_name, f"must be a floating tensor, got {t.dtype}")
        if not floating and t.dtype != torch.bool:
            fail(field_name, f"must be a bool tensor, got {t.dtype}")
    if batch.logp.requires_grad and not out.per_token_loss.requires_grad:
        fail("per_token_loss", "carries no gradient of batch.logp (was it detached?)")
    if not isinstance(out.metrics, Mapping):
        fail("metrics", f"must be a mapping of names to 0-dim tensors, got {type(out.metrics)}")
    for key, value in out.metrics.items():
        if not isinstance(key, str):
            fail("metrics", f"has a non-string key {key!r}")
        if isinstance(value, bool) or not (
            isinstance(value, int | float) or (torch.is_tensor(value) and value.numel() == 1)
        ):
            fail(f"metrics[{key!r}]", f"must be a 0-dim tensor or a number, got {value!r}")
    if values:
        with torch.no_grad():
            mask = batch.mask & torch.isfinite(batch.logp) & torch.isfinite(batch.logp_mu)
            mask &= torch.isfinite(batch.advantages_2d())
        for field_name in ("per_token_loss", "weight"):
            t = getattr(out, field_name).detach()
            if not bool(torch.isfinite(t[mask]).all()):
                fail(field_name, "is not finite on every real token with finite inputs")


@dataclass(frozen=True)
class BoundRule:
    """A rule and its resolved config: what a caller asks once per run, then the loss of each
    micro-batch without resolving again.

    Attributes:
        rule: the registered rule.
        cfg: the resolved config (read-only).
        draws_random: the rule reads ``RuleBatch.seed`` under this config.
    """

    rule: Rule
    cfg: Mapping[str, Any]
    draws_random: bool = False
    # whether the first call's values were checked (one device sync, then never again)
    _values_checked: list[bool] = field(default_factory=lambda: [False], compare=False, repr=False)

    @property
    def name(self) -> str:
        return self.rule.name

    @property
    def divergence(self) -> dict[str, Any] | None:
        """{kind, topk, sampled_token} the caller must put into ``RuleBatch.divergence``, or
        None for a rule that reads none."""
        if not self.rule.needs_divergence:
            return None
        c = self.cfg
        return {"kind": c["divergence"], "topk": c["topk"], "sampled_token": c["sampled_token"]}

    @property
    def needs_topk(self) -> bool:
        """The rule reads a Top-K divergence: mu's top-K must be recorded at rollout time."""
        spec = self.divergence
        return spec is not None and is_topk(spec["kind"])

    @property
    def binding(self) -> str | None:
        return self.rule.binding

    def metric_keys(self) -> list[str]:
        """The diagnostic keys the rule reports (from one call on a tiny batch, whose output is
        checked against the contract), so that a caller can log every key at every step (null
        when the rule did not run)."""
        lq = torch.full((2, 3), -1.0)
        batch = RuleBatch(
            (lq + 0.1).requires_grad_(True),
            lq,
            torch.tensor([1.0, -1.0]),
            torch.ones(2, 3, dtype=torch.bool),
            divergence=torch.full((2, 3), 0.01),
        )
        return sorted(self._run(batch, values=True).metrics)

    def __call__(self, batch: RuleBatch) -> RuleOutput:
        out = self._run(batch, values=not self._values_checked[0])
        self._values_checked[0] = True
        return out

    def _run(self, batch: RuleBatch, *, values: bool) -> RuleOutput:
        if self.rule.needs_divergence and batch.divergence is None:
            raise ValueError(
                f"rule {self.name!r} needs batch.divergence ({self.cfg['divergence']}, "
                f"K={self.cfg['topk']})"
            )
        out = self.rule.fn(batch, dict(self.cfg))
        check_output(self.name, out, batch, values=values)
        return out

    def check_contract(self) -> list[str]:
        """The rule's keys from one call on a tiny batch (the contract checked on its output),
        as metric_keys; raises RuleContractError for an output that breaks it."""
        return self.metric_keys()


_REGISTRY: dict[str, Rule] = {}


def register_rule(
    name: str,
    *,
    params: Mapping[str, Param] | None = None,
    divergence: str | None = None,
    topk: int = 20,
    check: Callable[[dict[str, Any]], None] | None = None,
    binding: str | None = "mask/fraction",
    draws_random: Callable[[Mapping[str, Any]], bool] | None = None,
) -> Callable[[RuleFn], Rule]:
    """Decorator registering ``fn(batch, cfg)`` under ``name``.

    Args:
        params: the rule's own parameters (common ones are added).
        divergence: default divergence kind when the rule reads one (adds the divergence keys).
        topk: default K for Top-K divergences.
        check: cross-parameter validation on the resolved config (raise RuleConfigError); it
            may also fill, in place, a null default that depends on other keys (TRM's
            per-estimator thresholds).
        binding: the diagnostic that says how much the rule binds (see Rule).
        draws_random: from the resolved config, whether the rule reads ``RuleBatch.seed``.
    """

    def deco(fn: RuleFn) -> Rule:
        if name in _REGISTRY:
            raise ValueError(f"rule {name!r} is already registered")
        schema = dict(COMMON_PARAMS)
        if divergence is not None:
            schema.update(divergence_params(divergence, topk))
        schema.update(params or {})
        rule = Rule(
            name,
            fn,
            schema,
            needs_divergence=divergence is not None,
            check=check,
            binding=binding,
            draws_random=draws_random,
        )
        _REGISTRY[name] = rule
        return rule

    return deco


def available_rules() -> list[str]:
    return sorted(_REGISTRY)


def get_rule(name: str) -> Rule:
    """The registered rule ``name``; a clear error listing the valid names otherwise."""
    try:
        return _REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(str(name), _REGISTRY, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise UnknownRuleError(
            f"unknown rule {name!r}{hint}; valid rules: {', '.join(available_rules())}"
        ) from None


def resolve_config(name: str, cfg: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Validate a method config against rule ``name`` and fill in its defaults."""
    return get_rule(name).resolve(cfg)
