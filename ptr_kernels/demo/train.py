"""The demo's training: a supervised warm start, then RL with verifiable rewards for each loss method.

Every method starts from the same warm-started weights and draws the same prompt and sampling streams
(seeded generators), so the runs differ only through the loss. Each step collects a group rollout,
then takes `updates_per_batch` full-batch optimizer steps against the log-probs recorded at rollout time:
after the first one the policy has moved away from the rollout policy and the trust region acts.
"""

from __future__ import annotations

import contextlib
import copy
import time
from dataclasses import dataclass, field

import torch

from .. import policy_loss
from ..config import PolicyLossConfig
from ..reference import token_terms
from . import rollout, task
from .model import CausalTransformer

METHODS = ("cppo", "dppo", "ppo")


@dataclass(frozen=True)
class DemoConfig:
    """Everything that defines a demo run; the defaults take well under a minute per method on one CPU core."""

    steps: int = 60  # RL steps (rollout batches) per method
    seed: int = 0
    methods: tuple = METHODS
    prompts_per_step: int = 16
    group_size: int = 8
    temperature: float = 1.0
    updates_per_batch: int = 4  # optimizer steps on each rollout batch
    lr: float = 1e-3
    # tuned so that the warm start gets about 40% of the held-out prompts right: RL has room to improve it
    warm_start_steps: int = 80
    warm_start_batch: int = 64
    warm_start_lr: float = 1e-3
    eval_prompts: int = 512
    dim: int = 64
    layers: int = 2
    heads: int = 4


@dataclass
class MethodResult:
    """One method's run. Per-step lists have one entry per RL step; position arrays are `[MAX_RESPONSE_LEN]`."""

    method: str
    reward: list = field(default_factory=list)  # mean rollout reward of the step
    mask_frac: list = field(default_factory=list)  # the loss's metric, averaged over the step's updates
    mask_frac_budget: list = field(default_factory=list)  # cppo only (0 for the others)
    # int64, summed over every update: valid tokens per position, and those rejected by the token threshold
    # (cppo, dppo) or the clip (ppo), and by cppo's prefix budget; together they are the loss's mask_frac
    valid_by_position: torch.Tensor = None
    rejected_token_by_position: torch.Tensor = None
    rejected_budget_by_position: torch.Tensor = None
    eval_reward: float = float("nan")  # exact-match rate on the held-out prompts after training
    trained_tokens: int = 0  # valid response tokens passed through the loss
    seconds: float = 0.0  # wall time of the RL loop (rollouts and updates)


def build_model(config: DemoConfig, device: torch.device) -> CausalTransformer:
    return CausalTransformer(task.VOCAB_SIZE, task.PROMPT_LEN + task.MAX_RESPONSE_LEN, dim=config.dim,
                             layers=config.layers, heads=config.heads).to(device)


def warm_start(config: DemoConfig, device: torch.device) -> CausalTransformer:
    """Random init, then a short teacher-forced cross-entropy fit on correct answers (so rewards are not all 0)."""
    torch.manual_seed(config.seed)
    model = build_model(config, device)
    generator = torch.Generator(device).manual_seed(config.seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.warm_start_lr)
    for _ in range(config.warm_start_steps):
        prompts = task.sample_prompts(config.warm_start_batch, generator)
        targets = task.answers(prompts)
        log_prob = rollout.response_log_prob(model, prompts, targets, temperature=1.0)
        loss = -(log_prob * task.response_mask(targets)).sum() / task.response_mask(targets).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model


@torch.no_grad()
def evaluate(model, config: DemoConfig, device: torch.device) -> float:
    """Exact-match rate of one sample (at the training temperature) per held-out prompt, with a fixed stream."""
    generator = torch.Generator(device).manual_seed(config.seed + 1_000_003)
    prompts = task.sample_prompts(config.eval_prompts, generator)
    responses, _ = rollout.sample(model, prompts, config.temperature, generator)
    return task.rewards(prompts, responses).mean().item()


def train_method(method: str, warm_model: CausalTransformer, config: DemoConfig, device: torch.device,
                 progress=None) -> MethodResult:
    """RL from a copy of `warm_model` with `policy_loss(method=method)`; `progress` (tqdm) advances per step."""
    model = copy.deepcopy(warm_model)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    loss_config = PolicyLossConfig(method=method)
    generator = torch.Generator(device).manual_seed(config.seed + 1)  # the same streams for every method
    result = MethodResult(method)
    valid = torch.zeros(task.MAX_RESPONSE_LEN, dtype=torch.int64, device=device)
    rejected_token, rejected_budget = torch.zeros_like(valid), torch.zeros_like(valid)
    start = time.perf_counter()
    for _ in range(config.steps):
        prompts = task.sample_prompts(config.prompts_per_step, generator)
        batch = rollout.collect(model, prompts, config.group_size, config.temperature, generator)
        step_metrics = []
        for _ in range(config.updates_per_batch):
            log_prob = rollout.response_log_prob(model, batch.prompts, batch.responses, config.temperature)
            loss, metrics = policy_loss(log_prob, batch.old_log_prob, batch.advantages, batch.mask,
                                        config=loss_config)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step_metrics.append(torch.stack([metrics["mask_frac"],
                                             metrics.get("mask_frac_budget", torch.zeros_like(loss))]))
            # the same inputs and config as the loss: these flags are the mask it applied, position by position
            with torch.no_grad():
                terms = token_terms(log_prob.detach(), batch.old_log_prob, batch.advantages, batch.mask,
                                    loss_config)
            valid += batch.mask.sum(dim=0)
            rejected_token += terms.rejected_token.sum(dim=0)
            rejected_budget += terms.rejected_budget.sum(dim=0)
        mask_frac, mask_frac_budget = torch.stack(step_metrics).mean(dim=0).tolist()
        result.reward.append(batch.rewards.mean().item())
        result.mask_frac.append(mask_frac)
        result.mask_frac_budget.append(mask_frac_budget)
        if progress is not None:
            progress.set_postfix(method=method, reward=f"{result.reward[-1]:.2f}", mask=f"{mask_frac:.3f}")
            progress.update()
    result.seconds = time.perf_counter() - start
    result.valid_by_position = valid.cpu()
    result.rejected_token_by_position = rejected_token.cpu()
    result.rejected_budget_by_position = rejected_budget.cpu()
    result.trained_tokens = int(valid.sum())
    result.eval_reward = evaluate(model, config, device)
    return result


@dataclass
class DemoResult:
    config: DemoConfig
    device: str
    warm_start_eval_reward: float  # the supervised-only baseline on the held-out prompts
    methods: dict  # method name -> MethodResult, in config.methods order


def run_demo(config: DemoConfig, device: torch.device, progress=None) -> DemoResult:
    """Warm start once, then train each of `config.methods` from it; deterministic for a seed on the CPU."""
    with _deterministic(device):
        if progress is not None:
            progress.set_postfix_str("supervised warm start")
        warm_model = warm_start(config, device)
        baseline = evaluate(warm_model, config, device)
        results = {method: train_method(method, warm_model, config, device, progress) for method in config.methods}
    return DemoResult(config, str(device), baseline, results)


@contextlib.contextmanager
def _deterministic(device: torch.device):
    """On the CPU: one thread (reductions then do not depend on the core count) and deterministic algorithms;
    both are restored afterwards. On CUDA nothing changes (bitwise determinism would need cuBLAS settings)."""
    if device.type != "cpu":
        yield
        return
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)
