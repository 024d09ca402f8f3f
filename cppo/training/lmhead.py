"""Top-K and gathered log-probs from the LM head without materialising [B, T, V] logits.

TRL's fused LM head returns only the sampled token's log-prob log p(y) = z_y - logZ and keeps
logZ internal. For any other token j at the same position,

    log p(j) = z_j - logZ = (z_j - z_y) + log p(y),

so the K+1 logits z_j, z_y (one dot product each with the final hidden state) plus the fused
head's log p(y) give exact log-probs at mu's top-K ids. Finding mu's top-K ids needs the full
logit row, which `topk_ids` computes in token chunks under no_grad.

`HeadCapture` is a forward hook on the model's backbone. It is idle (one attribute check) unless a
`HeadRequest` is armed by the trainer around a fused log-prob forward, so generation forwards that
run the same backbone are untouched. Everything here runs without gradient: divergences and masks
are stop-gradient quantities; the gradient flows only through the fused head's log p(y).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# Budget for one [chunk, V] logits tile in the top-K search (elements; fp32: 32 MiB, below the
# fused head's own tile buffer). On GPUs a larger diagnostics.mu_chunk_tokens is faster.
DEFAULT_TOPK_TILE_ELEMENTS = 1 << 23


@dataclass(frozen=True)
class HeadSpec:
    """How the fused head turns hidden states into logits (mirrors trl.trainer.utils.add_fused_lm_head)."""

    temperature: float = 1.0
    logit_scale: float = 1.0
    softcap: float | None = None
    cast_fp32: bool = False

    def transform(self, z: torch.Tensor) -> torch.Tensor:
        z = z.float() * self.logit_scale
        if self.softcap is not None:
            z = self.softcap * torch.tanh(z / self.softcap)
        return z / self.temperature


def head_spec_for(model: nn.Module, temperature: float, cast_fp32: bool) -> HeadSpec:
    """Read the logit scaling the fused head applies from the model config (same attributes, same order)."""
    cfg = model.config.get_text_config()
    softcap = getattr(cfg, "final_logit_softcapping", None)
    scale = getattr(cfg, "logit_scale", None)
    if scale is None:
        scale = getattr(cfg, "output_multiplier", None)
    if scale is None:
        scale = getattr(cfg, "lm_head_multiplier", None)
    if scale is None and getattr(cfg, "logits_scaling", None) is not None:
        scale = cfg.logits_scaling if cfg.model_type == "hyperclovax" else 1 / cfg.logits_scaling
    return HeadSpec(
        temperature=float(temperature),
        logit_scale=1.0 if scale is None else float(scale),
        softcap=softcap,
        cast_fp32=cast_fp32,
    )


def head_logits(head: nn.Module, hidden: torch.Tensor, spec: HeadSpec) -> torch.Tensor:
    """Scaled fp32 logits of hidden states: the fused head's arithmetic with `cast_fp32`."""
    bias = None if head.bias is None else head.bias.float()
    return spec.transform(F.linear(hidden.float(), head.weight.float(), bias))


def _compute_dtype(hidden: torch.Tensor, spec: HeadSpec) -> torch.dtype:
    # Same rule as the fused kernel: autocast dtype if autocast is on, else the hidden states' dtype.
    if spec.cast_fp32:
        return torch.float32
    dev = hidden.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return hidden.dtype


@contextlib.contextmanager
def full_head_weights(lm_head: nn.Module):
    """The LM head's weight and bias as plain full tensors (ZeRO-3 gather, FSDP2 DTensor)."""
    weight, bias = lm_head.weight, lm_head.bias
    from trl.trainer.utils import maybe_gather_lm_head_ctx

    with maybe_gather_lm_head_ctx(weight, bias):
        w, b = weight, bias
        if type(w).__name__ == "DTensor":
            w = w.full_tensor()
            b = b.full_tensor() if b is not None else None
        yield w, b


@torch.no_grad()
def gathered_logits(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    ids: torch.Tensor,
    spec: HeadSpec,
    chunk_tokens: int = 4096,
) -> torch.Tensor:
    """Transformed logits z[n, m] = f(hidden[n] . weight[ids[n, m]]) in fp32; hidden [N, H], ids [N, M]."""
    n_tok, m = ids.shape
    out = torch.empty(n_tok, m, dtype=torch.float32, device=hidden.device)
    cd = _compute_dtype(hidden, spec)
    for s in range(0, n_tok, chunk_tokens):
        e = min(s + chunk_tokens, n_tok)
        rows = weight[ids[s:e].long()].to(cd)  # [n, M, H]
        z = torch.bmm(rows, hidden[s:e].to(cd).unsqueeze(-1)).squeeze(-1)
        if bias is not None:
            z = z + bias[ids[s:e].long()].to(cd)
        out[s:e] = spec.transform(z)
    return out


@torch.no_grad()
def topk_ids(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    k: int,
    spec: HeadSpec,
    chunk_tokens: int | None = None,
) -> torch.Tensor:
    """Ids of the k largest logits per row of hidden [N, H], via [chunk, V] tiles."""
    n_tok = hidden.shape[0]
    vocab = weight.shape[0]
    if chunk_tokens is None:
        chunk_tokens = max(1, DEFAULT_TOPK_TILE_ELEMENTS // vocab)
    out = torch.empty(n_tok, k, dtype=torch.long, device=hidden.device)
    cd = _compute_dtype(hidden, spec)
    w = weight.to(cd)
    for s in range(0, n_tok, chunk_tokens):
        e = min(s + chunk_tokens, n_tok)
        z = hidden[s:e].to(cd) @ w.t()
        if bias is not None:
            z = z + bias.to(cd)
        # The logit transform is monotone, so the raw logits rank tokens the same way.
        out[s:e] = torch.topk(z.float(), k, dim=-1).indices
    return out


@dataclass
class HeadRequest:
    """What to compute for the completion tokens of one fused log-prob forward.

    topk > 0: find the top-`topk` ids (rollout-policy recording). Otherwise, if `gather_ids`
    ([B, C, M] ids) is given, gather at those ids (current-policy pass). The sampled token's logit
    is always gathered too, so results are logit differences z_j - z_y, turned into log-probs by
    `finish` once the fused head has produced log p(y).
    """

    logits_to_keep: int
    topk: int = 0
    gather_ids: torch.Tensor | None = None
    chunk_tokens: int | None = None
    # filled by the hook, one entry per forward call (row chunk), in order
    _ids: list[torch.Tensor] = field(default_factory=list)
    _diff: list[torch.Tensor] = field(default_factory=list)
    _row: int = 0
    ids: torch.Tensor | None = None  # [B, C, K] (topk mode)
    logps: torch.Tensor | None = None  # [B, C, M]
    sampled_logps: torch.Tensor | None = None  # [B, C]

    @property
    def width(self) -> int:
        if self.topk:
            return self.topk
        return 0 if self.gather_ids is None else int(self.gather_ids.shape[-1])

    def finish(self, sampled_logps: torch.Tensor) -> None:
        """Combine the captured logit differences with the fused head's log p(y) [B, C]."""
        self.sampled_logps = sampled_logps.detach().float()
        if self.width == 0:
            return
        if not self._diff:
            raise RuntimeError("the LM-head hook did not fire during the fused forward")
        diff = torch.cat(self._diff, dim=0)
        if diff.shape[:2] != sampled_logps.shape:
            raise RuntimeError(
                f"captured {tuple(diff.shape[:2])} rows, expected {tuple(sampled_logps.shape)}"
            )
        self.logps = diff + self.sampled_logps.unsqueeze(-1)
        if self.topk:
            self.ids = torch.cat(self._ids, dim=0)
        self._diff.clear()
        self._ids.clear()


class HeadCapture:
    """Forward hook on the backbone that serves `HeadRequest`s during fused log-prob forwards."""

    def __init__(self, model: nn.Module, spec: HeadSpec):
        self.model = model  # the unwrapped causal LM (owner of the LM head)
        self.spec = spec
        self.request: HeadRequest | None = None
        backbone = model.base_model
        self._handle = backbone.register_forward_hook(self._hook, with_kwargs=True)

    def remove(self) -> None:
        self._handle.remove()

    @contextlib.contextmanager
    def armed(self, request: HeadRequest):
        if self.request is not None:
            raise RuntimeError("a head request is already armed")
        self.request = request
        try:
            yield request
        finally:
            self.request = None

    def _hook(self, module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> None:
        req = self.request
        if req is None or req.width == 0:
            return
        hidden = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        attn = kwargs.get("attention_mask")
        if input_ids is None:
            raise RuntimeError("the LM-head hook needs input_ids")
        c = req.logits_to_keep
        n_rows = hidden.shape[0]
        with torch.no_grad():
            h = hidden.detach()[:, -c - 1 : -1]  # the state at p predicts the token at p + 1
            labels = input_ids[:, -c:]
            valid = (
                attn[:, -c:].bool()
                if attn is not None
                else torch.ones_like(labels, dtype=torch.bool)
            )
            hv = h[valid]
            yv = labels[valid].to(hv.device)
            width = req.width
            diff = torch.zeros(n_rows, c, width, dtype=torch.float32, device=hv.device)
            ids_out = (
                torch.zeros(n_rows, c, width, dtype=torch.int32, device=hv.device)
                if req.topk
                else None
            )
            lm_head = self.model.get_output_embeddings()
            # Entered on every call, even with no valid token here: under ZeRO-3 / FSDP2 getting the
            # full weight is a collective that every rank must join the same number of times.
            with full_head_weights(lm_head) as (w, b):
                if hv.shape[0]:
                    hv = hv.to(w.device)
                    if req.topk:
                        ids = topk_ids(hv, w, b, req.topk, self.spec, req.chunk_tokens)
                    else:
                        rows = slice(req._row, req._row + n_rows)
                        ids = req.gather_ids[rows].to(hv.device)[valid].long()
                    z = gathered_logits(
                        hv, w, b, torch.cat([ids, yv.unsqueeze(-1)], dim=-1), self.spec
                    )
                    diff[valid] = z[:, :-1] - z[:, -1:]
                    if ids_out is not None:
                        ids_out[valid] = ids.to(torch.int32)
            req._diff.append(diff)
            if ids_out is not None:
                req._ids.append(ids_out)
            req._row += n_rows
