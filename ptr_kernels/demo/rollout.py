"""Group rollouts: sample responses with temperature, record the rollout policy's log-probs, score them.

The policy is `softmax(logits / temperature)` both when sampling and when training (as in verl), so the
recorded `old_log_prob` and the trained `log_prob` are log-probs of the same distribution family.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from . import task


class Rollout(NamedTuple):
    """One rollout batch of B = prompts x group_size sequences, group members adjacent."""

    prompts: torch.Tensor  # int64 [B, PROMPT_LEN]
    responses: torch.Tensor  # int64 [B, MAX_RESPONSE_LEN]
    old_log_prob: torch.Tensor  # float32 [B, MAX_RESPONSE_LEN]: log mu(y_t | s_t) recorded while sampling
    mask: torch.Tensor  # bool [B, MAX_RESPONSE_LEN]: up to and including the first EOS
    rewards: torch.Tensor  # float32 [B]: 1 for an exact match
    advantages: torch.Tensor  # float32 [B]: group-normalized rewards


@torch.no_grad()
def sample(model, prompts: torch.Tensor, temperature: float, generator: torch.Generator):
    """Sample MAX_RESPONSE_LEN tokens after each prompt: (responses int64 `[B, L]`, log-probs float32 `[B, L]`).

    Sampling goes on after EOS (those tokens are masked later): every row has the same length.
    """
    tokens, log_probs = prompts, []
    for _ in range(task.MAX_RESPONSE_LEN):
        logp = F.log_softmax(model(tokens)[:, -1] / temperature, dim=-1)
        next_token = torch.multinomial(logp.exp(), 1, generator=generator)
        log_probs.append(logp.gather(1, next_token))
        tokens = torch.cat([tokens, next_token], dim=1)
    return tokens[:, prompts.shape[1]:], torch.cat(log_probs, dim=1)


def response_log_prob(model, prompts: torch.Tensor, responses: torch.Tensor, temperature: float) -> torch.Tensor:
    """log pi(y_t | s_t) of the given responses in one forward pass: float32 `[B, L]`, with gradient."""
    logits = model(torch.cat([prompts, responses[:, :-1]], dim=1))[:, prompts.shape[1] - 1:]
    return F.log_softmax(logits / temperature, dim=-1).gather(2, responses[..., None]).squeeze(2)


def group_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """GRPO's advantages `[B]`: (r - group mean) / (group std + 1e-6); 0 for a group with one reward."""
    groups = rewards.view(-1, group_size)
    centered = groups - groups.mean(dim=1, keepdim=True)
    return (centered / (groups.std(dim=1, unbiased=False, keepdim=True) + 1e-6)).view(-1)


def collect(model, prompts: torch.Tensor, group_size: int, temperature: float,
            generator: torch.Generator) -> Rollout:
    """`group_size` samples of each prompt (`[P, PROMPT_LEN]`), scored and with advantages."""
    prompts = prompts.repeat_interleave(group_size, dim=0)
    responses, old_log_prob = sample(model, prompts, temperature, generator)
    rewards = task.rewards(prompts, responses)
    return Rollout(prompts, responses, old_log_prob, task.response_mask(responses), rewards,
                   group_advantages(rewards, group_size))
