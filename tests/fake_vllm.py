"""A stand-in for a live vLLM engine (vLLM is not installed on CPU test machines).

`FakeEngine.generate(prompts, sampling_params, use_tqdm=...)` follows vLLM's `LLM.generate`
contract as the evaluation backend uses it: one output per request, in request order; a request
with `n` and `seed` has `n` children, child `j` seeded `seed + j` (vLLM's
`ParentRequest._get_child_sampling_params`). A child's completion is a pure function of the
prompt token ids and its seed (`FakeEngine.complete`), so tests can predict every sample.
"""

from __future__ import annotations

import hashlib
import types
from typing import Any

ANSWERS = 4  # completions answer "Answer: 0" .. "Answer: 3"


class FakeSamplingParams:
    """Keeps its keyword arguments as attributes, like vllm.SamplingParams."""

    def __init__(self, **kwargs: Any):
        self.__dict__.update(kwargs)


class FakeEngine:
    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.calls: list[tuple[list[dict], list[Any]]] = []

    def get_tokenizer(self) -> Any:
        return self.tokenizer

    @staticmethod
    def complete(prompt_ids: list[int], seed: int, max_tokens: int) -> types.SimpleNamespace:
        digest = hashlib.sha256(repr((list(prompt_ids), int(seed))).encode()).digest()
        if digest[1] % 5 == 0:  # one in five runs out of tokens
            text, finish, n_tokens = "still thinking", "length", max_tokens
        else:
            text, finish = f"Answer: {digest[0] % ANSWERS}", "stop"
            n_tokens = min(len(text) + 1, max_tokens)
        return types.SimpleNamespace(
            text=text, token_ids=list(range(n_tokens)), finish_reason=finish
        )

    def generate(self, prompts: list[dict], sampling_params: list[Any], use_tqdm: bool = True):
        self.calls.append((list(prompts), list(sampling_params)))
        outputs = []
        for prompt, params in zip(prompts, sampling_params, strict=True):
            children = [
                self.complete(prompt["prompt_token_ids"], params.seed + j, params.max_tokens)
                for j in range(params.n)
            ]
            outputs.append(types.SimpleNamespace(outputs=children))
        return outputs
