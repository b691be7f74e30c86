"""The README's Usage snippets run as written (each on its own, as a reader pastes it), on the CPU."""

import math
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def usage_blocks() -> list:
    """The ```python blocks of the README's "## Usage" section."""
    text = README.read_text()
    section = text.split("\n## Usage\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, re.DOTALL)


def test_usage_has_the_padded_packed_from_logits_and_from_hidden_snippets():
    blocks = usage_blocks()
    assert len(blocks) == 3
    assert "cu_seqlens" in blocks[0] and "policy_loss_from_logits" in blocks[1]
    assert "policy_loss_from_hidden" in blocks[2]


@pytest.mark.parametrize("index", [0, 1, 2], ids=["policy_loss", "policy_loss_from_logits", "policy_loss_from_hidden"])
def test_usage_snippet_runs(index):
    scope = {}
    exec(compile(usage_blocks()[index], f"README.md usage block {index}", "exec"), scope)
    assert math.isfinite(scope["loss"].item())
    assert {"mask_frac", "ppo_kl"} <= set(scope["metrics"])
    if index == 1:
        assert scope["logits"].grad.shape == scope["logits"].shape and scope["logits"].grad.abs().sum() > 0
    if index == 2:
        for grad in (scope["hidden"].grad, scope["lm_head"].weight.grad, scope["lm_head"].bias.grad):
            assert grad is not None and grad.abs().sum() > 0
