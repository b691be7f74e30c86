"""The verifiable task: write the distinct digits of the prompt in increasing order, then stop.

    prompt   3 1 4 1 5 9 2 6 >        (PROMPT_DIGITS digits, then SEP)
    answer   1 2 3 4 5 6 9 <eos>      (the distinct digits sorted, then EOS)

The answer's length depends on the prompt (2 to PROMPT_DIGITS + 1 tokens with EOS), so rollouts have
ragged responses and a real `response_mask`. The reward is 1 for an exact match (EOS included) and 0
otherwise, checked by this program: no learned reward model.
"""

from __future__ import annotations

import torch

DIGITS = 10
SEP = 10
EOS = 11
VOCAB_SIZE = 12
PROMPT_DIGITS = 8
PROMPT_LEN = PROMPT_DIGITS + 1
MAX_RESPONSE_LEN = PROMPT_DIGITS + 1  # at most PROMPT_DIGITS distinct digits, then EOS


def sample_prompts(n: int, generator: torch.Generator) -> torch.Tensor:
    """`n` random prompts, int64 `[n, PROMPT_LEN]` on the generator's device."""
    digits = torch.randint(0, DIGITS, (n, PROMPT_DIGITS), generator=generator, device=generator.device)
    return torch.cat([digits, digits.new_full((n, 1), SEP)], dim=1)


def answers(prompts: torch.Tensor) -> torch.Tensor:
    """The correct responses, int64 `[n, MAX_RESPONSE_LEN]`: sorted distinct digits, then EOS to the end."""
    present = torch.zeros(prompts.shape[0], DIGITS, dtype=torch.bool, device=prompts.device)
    present.scatter_(1, prompts[:, :PROMPT_DIGITS], True)
    digit_ids = torch.arange(DIGITS, device=prompts.device).expand_as(present)
    # absent digits sort after every present one and become EOS
    ordered = torch.where(present, digit_ids, DIGITS + digit_ids).sort(dim=1).values
    # PROMPT_DIGITS < DIGITS: at least one absent digit, so every answer has its EOS within MAX_RESPONSE_LEN
    return torch.where(ordered < DIGITS, ordered, EOS)[:, :MAX_RESPONSE_LEN]


def response_mask(responses: torch.Tensor) -> torch.Tensor:
    """bool `[n, L]`: the tokens up to and including the first EOS (all of them if there is none)."""
    eos_before = torch.cumsum((responses == EOS).long(), dim=1) - (responses == EOS).long()
    return eos_before == 0


def rewards(prompts: torch.Tensor, responses: torch.Tensor) -> torch.Tensor:
    """float32 `[n]`: 1 where the response up to its first EOS is exactly the answer, else 0."""
    target = answers(prompts)[:, :responses.shape[1]]
    # the answer's own EOS lies inside its valid span, so a match also ends the response at the right place
    target_span = response_mask(target)
    return ((responses == target) | ~target_span).all(dim=1).float()
