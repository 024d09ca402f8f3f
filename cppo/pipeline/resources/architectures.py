"""The architecture numbers that size a model's memory (from each model's config.json)."""

from __future__ import annotations

import math
from dataclasses import dataclass

GIB = 1024**3
BF16 = 2
FP32 = 4

@dataclass(frozen=True)
class Architecture:
    """The numbers of a decoder-only transformer that size its memory (names as in config.json)."""

    layers: int  # num_hidden_layers
    hidden: int  # hidden_size
    heads: int  # num_attention_heads
    kv_heads: int  # num_key_value_heads
    head_dim: int
    vocab: int  # vocab_size
    intermediate: int  # intermediate_size of a dense MLP (0: every layer is MoE)
    tied_embeddings: bool  # tie_word_embeddings
    experts: int = 0  # num_experts (0: dense)
    experts_per_token: int = 0  # num_experts_per_tok
    moe_intermediate: int = 0  # moe_intermediate_size

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def mlp_width(self) -> int:
        """Width of the MLP a token passes through (its experts' together in an MoE layer)."""
        if self.experts:
            return self.experts_per_token * self.moe_intermediate
        return self.intermediate

    def layer_params(self, active: bool = False) -> int:
        """One decoder layer: q/k/v/o projections, q/k norms, the MLP (gate, up, down), two norms;
        an MoE layer has `experts` MLPs (`experts_per_token` active) and a router."""
        attention = 2 * self.hidden * self.q_dim + 2 * self.hidden * self.kv_dim + 2 * self.head_dim
        if self.experts:
            n = self.experts_per_token if active else self.experts
            mlp = n * 3 * self.hidden * self.moe_intermediate + self.hidden * self.experts
        else:
            mlp = 3 * self.hidden * self.intermediate
        return attention + mlp + 2 * self.hidden

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden

    def params(self, active: bool = False) -> int:
        """Distinct parameters (a tied LM head counted once) + the final norm."""
        heads = 1 if self.tied_embeddings else 2
        return self.layers * self.layer_params(active) + heads * self.embedding_params + self.hidden

    def kv_bytes_per_token(self, tensor_parallel_size: int = 1) -> int:
        """bf16 K and V of every layer for one token on one GPU; vLLM splits the KV heads over
        the tensor-parallel ranks (replicating them when there are more ranks than heads)."""
        heads = math.ceil(self.kv_heads / tensor_parallel_size)
        return 2 * self.layers * heads * self.head_dim * BF16


# From each model's config.json on the Hugging Face hub (Qwen/<name>; the -Base checkpoints
# share the architecture of the post-trained ones). Parameter counts follow from these numbers
# (Architecture.params): Qwen3-1.7B 1.72B distinct (the hub page says 2.03B because the tied LM
# head is stored twice), Qwen3-8B 8.19B, Qwen3-30B-A3B 30.5B total / 3.3B active per token.
ARCHITECTURES: dict[str, Architecture] = {
    "Qwen3-1.7B": Architecture(
        layers=28,
        hidden=2048,
        heads=16,
        kv_heads=8,
        head_dim=128,
        vocab=151936,
        intermediate=6144,
        tied_embeddings=True,
    ),
    "Qwen3-8B": Architecture(
        layers=36,
        hidden=4096,
        heads=32,
        kv_heads=8,
        head_dim=128,
        vocab=151936,
        intermediate=12288,
        tied_embeddings=False,
    ),
    # config.json also lists intermediate_size 6144, unused: every layer is MoE
    # (decoder_sparse_step 1, no mlp_only_layers)
    "Qwen3-30B-A3B": Architecture(
        layers=48,
        hidden=2048,
        heads=32,
        kv_heads=4,
        head_dim=128,
        vocab=151936,
        intermediate=0,
        tied_embeddings=False,
        experts=128,
        experts_per_token=8,
        moe_intermediate=768,
    ),
}


def architecture_name(hub_id: str) -> str | None:
    """ "Qwen/Qwen3-8B-Base" -> "Qwen3-8B"; None when ARCHITECTURES has no entry."""
    name = hub_id.split("/")[-1].removesuffix("-Base")
    return name if name in ARCHITECTURES else None


