"""Reference generation for the server tests: plain greedy decoding with the library's hooks, no server."""

from __future__ import annotations

import torch

from steering_vectors.core.hooks import Steerer, build_plan, combine_lora, combine_low_rank, combine_offsets
from steering_vectors.core.models import LoadedModel
from steering_vectors.core.profile import Profile


def chat_ids(loaded: LoadedModel, content: str) -> list[int]:
    text = loaded.tokenizer.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
    )
    return list(loaded.tokenizer(text, add_special_tokens=False)["input_ids"])


@torch.inference_mode()
def greedy(
    loaded: LoadedModel, prompt_ids: list[int], max_new: int, steering: list[tuple[Profile, float]] | None = None,
    position: str = "all",
) -> list[int]:
    """Greedy tokens by full recomputation each step (no KV cache), steering the positions that `position`
    names (every position by default)."""
    steerer = Steerer.attach(loaded.model)
    eos = loaded.tokenizer.eos_token_id
    ids = list(prompt_ids)
    out: list[int] = []

    def plan():
        if not steering:
            return None
        return build_plan(
            [combine_offsets(steering)], row_low_rank=[combine_low_rank(steering)], row_lora=[combine_lora(steering)],
            modes=[position], positions=torch.arange(len(ids))[None], prompt_lengths=[len(prompt_ids)],
        )

    for _ in range(max_new):
        with steerer.steering(plan()):
            logits = loaded.model(input_ids=torch.tensor([ids])).logits[0, -1]
        token = int(torch.argmax(logits.float()))
        out.append(token)
        ids.append(token)
        if token == eos:
            break
    return out


def text_of(loaded: LoadedModel, tokens: list[int]) -> str:
    return loaded.tokenizer.decode(tokens, skip_special_tokens=True)
