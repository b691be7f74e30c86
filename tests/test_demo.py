"""`ptr-kernels demo`: the task's checker, GRPO advantages, the rejection counts, determinism, and an end-to-end
run that must beat its supervised-only starting point."""

import csv
import math

import pytest
import torch

from ptr_kernels.cli import main
from ptr_kernels.demo import rollout, task
from ptr_kernels.demo.train import DemoConfig, run_demo

CPU = torch.device("cpu")
# a cheap config for the mechanics (rewards stay near 0 after 20 warm-start steps)
TINY = DemoConfig(steps=2, warm_start_steps=20, eval_prompts=64, prompts_per_step=4)


def test_task_answers_and_rewards():
    prompts = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6, task.SEP], [7, 7, 7, 7, 7, 7, 7, 7, task.SEP]])
    E = task.EOS
    expected = torch.tensor([[1, 2, 3, 4, 5, 6, 9, E, E], [7, E, E, E, E, E, E, E, E]])
    assert torch.equal(task.answers(prompts), expected)
    responses = torch.stack([
        expected[0],
        torch.tensor([7, E, 3, 3, 3, 3, 3, 3, 3]),  # garbage after the first EOS does not count
    ])
    assert task.rewards(prompts, responses).tolist() == [1.0, 1.0]
    assert task.response_mask(responses)[1].tolist() == [True, True] + [False] * 7
    wrong = torch.stack([
        torch.tensor([1, 2, 3, 4, 5, 6, 9, 9, E]),  # a repeated digit
        torch.tensor([7, 7, 7, 7, 7, 7, 7, 7, 7]),  # never stops
    ])
    assert task.rewards(prompts, wrong).tolist() == [0.0, 0.0]
    assert task.response_mask(wrong[1:]).all()


def test_group_advantages_hand_computed():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    adv = rollout.group_advantages(rewards, group_size=4)
    std = math.sqrt(0.25 * 0.75)
    expected = [0.75 / std, -0.25 / std, -0.25 / std, -0.25 / std, 0.0, 0.0, 0.0, 0.0]
    assert adv.tolist() == pytest.approx(expected, rel=1e-5)


def test_rejections_by_position_are_the_loss_mask():
    # one step: every update sees the same batch, so the per-position counts add up to the loss's metrics;
    # a high lr and 6 updates make the policy drift far enough for every method to reject some tokens
    config = DemoConfig(steps=1, warm_start_steps=60, eval_prompts=64, lr=1e-2, updates_per_batch=6)
    for method, res in run_demo(config, CPU).methods.items():
        valid = res.valid_by_position.sum().item()
        token, budget = res.rejected_token_by_position.sum().item(), res.rejected_budget_by_position.sum().item()
        assert token + budget > 0, method  # the check below must not be 0 == 0
        assert (token + budget) / valid == pytest.approx(res.mask_frac[0], rel=1e-6), method
        assert budget / valid == pytest.approx(res.mask_frac_budget[0], rel=1e-6, abs=1e-12), method
        if method != "cppo":
            assert budget == 0


def test_deterministic_for_a_seed():
    threads = torch.get_num_threads()
    first, second = run_demo(TINY, CPU), run_demo(TINY, CPU)
    assert first.warm_start_eval_reward == second.warm_start_eval_reward
    for method in TINY.methods:
        a, b = first.methods[method], second.methods[method]
        assert (a.reward, a.mask_frac, a.mask_frac_budget, a.eval_reward) == \
            (b.reward, b.mask_frac, b.mask_frac_budget, b.eval_reward)
        assert torch.equal(a.rejected_token_by_position, b.rejected_token_by_position)
        assert torch.equal(a.rejected_budget_by_position, b.rejected_budget_by_position)
    assert torch.get_num_threads() == threads and not torch.are_deterministic_algorithms_enabled()  # restored


def test_cli_beats_supervised_only_and_writes_outputs(tmp_path, capsys):
    # seed 0, 8 steps: 0.41 -> 0.61 (cppo), 0.65 (dppo), 0.64 (ppo) held-out exact match when this was written
    assert main(["demo", "--steps", "8", "--seed", "0", "--out", str(tmp_path)]) == 0
    for name in ("reward.png", "rejection_by_position.png", "budget_share.png", "demo.png", "summary.md",
                 "summary.csv", "history.csv", "positions.csv"):
        assert (tmp_path / name).stat().st_size > 0, name
    with (tmp_path / "summary.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["method"] for r in rows] == ["cppo", "dppo", "ppo"]
    for r in rows:
        assert float(r["supervised_only_reward"]) > 0.2, r  # the warm start gets some prompts right
        assert float(r["final_reward"]) > float(r["supervised_only_reward"]) + 0.1, r
    with (tmp_path / "history.csv").open() as f:
        history = list(csv.DictReader(f))
    assert len(history) == 3 * 8
    for r in rows:  # a run shorter than 10 steps averages all of them, and says so
        rewards = [float(h["rollout_reward"]) for h in history if h["method"] == r["method"]]
        assert float(r["final_rollout_reward"]) == pytest.approx(sum(rewards) / 8, abs=1e-4)
    assert "| held-out exact match: supervised only -> after RL | rollout reward, last 8 steps |" in \
        (tmp_path / "summary.md").read_text()
    assert "| cppo |" in capsys.readouterr().out
