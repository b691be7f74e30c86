"""ptr_kernels.integrations.trl.GRPOTrainer against the real TRL 1.16.0 GRPOTrainer (the `trl` extra).

A tiny randomly initialized Llama and a word-level tokenizer built here (no download), two optimizer steps
with gradient accumulation 2 and two iterations per generation (so the second step has ratios != 1 and the
clip binds), same seeds: TRL's trainer and ours with policy_loss_config=None give equal losses, gradients
and clip metrics at every step, for each loss_type we cover; a CPPO run trains and logs our metrics.
"""

import importlib.util
import warnings

import pytest
import torch

# skipped only where trl is not installed at all; a broken install fails here instead of skipping
if importlib.util.find_spec("trl") is None:
    pytest.skip("needs the trl extra: pip install -c .ci/constraints.txt -e '.[trl]'",
                allow_module_level=True)

import trl  # noqa: E402
from datasets import Dataset  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, TrainerCallback  # noqa: E402

from ptr_kernels import PolicyLossConfig  # noqa: E402
from ptr_kernels.integrations.trl import GRPOTrainer  # noqa: E402

WORDS = ["<pad>", "<eos>"] + [f"w{i}" for i in range(30)]
RTOL = 1e-5


def tiny_tokenizer():
    vocab = {word: i for i, word in enumerate(WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>",
                                   padding_side="left")


def tiny_model():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(WORDS), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                         pad_token_id=0, eos_token_id=1, bos_token_id=1)
    return LlamaForCausalLM(config)


def reward(completions, **kwargs):
    """A deterministic reward that differs inside a group: how many even words a completion holds."""
    return [float(sum(int(w[1:]) % 2 == 0 for w in c.split() if w.startswith("w"))) for c in completions]


class GradientRecorder(TrainerCallback):
    """Copies every parameter's gradient just before each optimizer step."""

    def __init__(self, model):
        self.model, self.steps = model, []

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.steps.append({n: p.grad.detach().clone() for n, p in self.model.named_parameters()
                           if p.grad is not None})


def make_trainer(trainer_cls, tmp_path, loss_type, options=None, model=None, **kwargs):
    """A trainer for two optimizer steps (`options`: more GRPOConfig fields) on `model` (default: tiny_model())."""
    args = trl.GRPOConfig(
        output_dir=str(tmp_path / loss_type), loss_type=loss_type, per_device_train_batch_size=4,
        num_generations=4, gradient_accumulation_steps=2, num_iterations=2, max_completion_length=6,
        max_steps=2, learning_rate=1e-2, logging_steps=1, save_strategy="no", report_to="none", seed=1,
        use_cpu=True, bf16=False, temperature=1.0, epsilon_high=0.28, dataloader_num_workers=0, **(options or {}))
    dataset = Dataset.from_dict({"prompt": ["w1 w2 w3", "w4 w5", "w6 w7 w8 w9", "w10"] * 4})
    return trainer_cls(model=model or tiny_model(), reward_funcs=reward, args=args, train_dataset=dataset,
                       processing_class=tiny_tokenizer(), **kwargs)


def train(trainer_cls, tmp_path, loss_type, options=None, **kwargs):
    """Two optimizer steps (`options`: more GRPOConfig fields); returns (per-step logs, per-step gradients)."""
    trainer = make_trainer(trainer_cls, tmp_path, loss_type, options, **kwargs)
    recorder = GradientRecorder(trainer.model)
    trainer.add_callback(recorder)
    torch.manual_seed(1)
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    return logs, recorder.steps


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo", "luspo"])
def test_same_losses_and_gradients_as_trl(tmp_path, loss_type):
    trl_logs, trl_grads = train(trl.GRPOTrainer, tmp_path / "trl", loss_type)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="ptr_kernels GRPOTrainer")  # no fallback here
        our_logs, our_grads = train(GRPOTrainer, tmp_path / "ours", loss_type)
    assert len(trl_grads) == len(our_grads) == 2
    for theirs, ours in zip(trl_grads, our_grads):
        assert theirs.keys() == ours.keys()
        for name in theirs:
            torch.testing.assert_close(ours[name], theirs[name], rtol=RTOL, atol=1e-8, msg=name)
    assert any(g.abs().sum() > 0 for g in trl_grads[1].values())
    assert len(trl_logs) == len(our_logs) == 2
    for theirs, ours in zip(trl_logs, our_logs):
        for key in ("loss", "entropy", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean",
                    "clip_ratio/low_min", "clip_ratio/high_max"):
            assert ours[key] == pytest.approx(theirs[key], rel=RTOL, abs=1e-7), key


def test_cppo_run_trains_and_logs_our_metrics(tmp_path):
    logs, grads = train(GRPOTrainer, tmp_path, "dapo", policy_loss_config=PolicyLossConfig(method="cppo"))
    assert len(grads) == 2 and all(torch.isfinite(g).all() for step in grads for g in step.values())
    assert any(g.abs().sum() > 0 for g in grads[1].values())
    for key in ("ptr/mask_frac", "ptr/ppo_kl", "ptr/mask_frac_budget", "ptr/delta_b_mean"):
        assert all(key in entry for entry in logs), key
    assert logs[0]["ptr/ppo_kl"] == pytest.approx(0.0, abs=1e-6)  # step 1: the policy is the rollout policy
    # TRL's own key for the fraction the trust region cuts, beside ours, for existing dashboards
    assert [entry["clip_ratio/region_mean"] for entry in logs] == [entry["ptr/mask_frac"] for entry in logs]
    assert logs[0]["clip_ratio/region_mean"] == 0.0  # ratios of 1 are inside every trust region


def test_unsupported_configuration_falls_back_with_one_warning(tmp_path):
    options = {"importance_sampling_level": "sequence"}
    trl_logs, trl_grads = train(trl.GRPOTrainer, tmp_path / "trl", "grpo", options)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        our_logs, our_grads = train(GRPOTrainer, tmp_path / "ours", "grpo", options)
    fallbacks = [w for w in caught if "ptr_kernels GRPOTrainer" in str(w.message)]
    assert len(fallbacks) == 1 and "importance_sampling_level='sequence'" in str(fallbacks[0].message)
    assert [entry["loss"] for entry in our_logs] == [entry["loss"] for entry in trl_logs]
    for theirs, ours in zip(trl_grads, our_grads):
        for name in theirs:
            torch.testing.assert_close(ours[name], theirs[name], rtol=0, atol=0)


UNSUPPORTED_OPTIONS = [
    ({"loss_type": "cispo"}, "loss_type='cispo'"),
    ({"loss_type": "sapo"}, "loss_type='sapo'"),
    ({"loss_type": "vespo"}, "loss_type='vespo'"),
    ({"beta": 0.04}, "beta=0.04"),
    ({"importance_sampling_level": "sequence"}, "importance_sampling_level='sequence'"),
    ({"top_entropy_quantile": 0.5}, "top_entropy_quantile=0.5"),
    ({"off_policy_mask_threshold": 0.5}, "off_policy_mask_threshold=0.5"),
    ({"delta": 1.5}, "delta=1.5"),
    ({"entropy_coef": 0.01}, "entropy_coef=0.01"),
    ({"use_adaptive_entropy": True}, "use_adaptive_entropy=True"),
]


@pytest.mark.parametrize("options, named", UNSUPPORTED_OPTIONS, ids=[n for _, n in UNSUPPORTED_OPTIONS])
def test_explicit_config_refuses_an_option_it_cannot_compute(tmp_path, options, named):
    options = dict(options)
    with pytest.raises(ValueError, match="GRPOConfig option") as refused:
        make_trainer(GRPOTrainer, tmp_path, options.pop("loss_type", "grpo"), options,
                     policy_loss_config=PolicyLossConfig(method="cppo"))
    assert named in str(refused.value)


def test_explicit_config_refuses_a_router_auxiliary_loss(tmp_path):
    """The router loss depends on the model (a MoE that returns router logits), so it is refused once TRL has it."""
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(vocab_size=len(WORDS), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                           num_attention_heads=2, num_key_value_heads=1, num_local_experts=2, num_experts_per_tok=1,
                           max_position_embeddings=64, pad_token_id=0, eos_token_id=1, bos_token_id=1)
    assert config.router_aux_loss_coef > 0
    with pytest.raises(ValueError, match="router_aux_loss_coef"):
        make_trainer(GRPOTrainer, tmp_path, "grpo", model=MixtralForCausalLM(config),
                     policy_loss_config=PolicyLossConfig(method="dppo"))
    # without a PolicyLossConfig TRL's own loss computes it: the documented fallback
    trainer = make_trainer(GRPOTrainer, tmp_path, "grpo", model=MixtralForCausalLM(config))
    assert "router_aux_loss_coef" in trainer.fallback_reason()


def test_bad_backend_is_refused_at_construction(tmp_path):
    with pytest.raises(ValueError, match="policy_loss_backend='trition' is invalid"):
        make_trainer(GRPOTrainer, tmp_path, "grpo", policy_loss_backend="trition")


def test_a_field_the_method_ignores_warns_once(tmp_path):
    config = PolicyLossConfig(method="dppo", w_min=0.7, delta=0.2)  # w_min is cppo's; delta is dppo's
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        logs, _ = train(GRPOTrainer, tmp_path, "dapo", policy_loss_config=config)
    ours = [str(w.message) for w in caught if "ptr_kernels GRPOTrainer" in str(w.message)]
    assert len(ours) == 1 and "w_min=0.7" in ours[0] and "delta=" not in ours[0]
    assert len(logs) == 2


def test_loss_type_decides_the_aggregation_and_a_config_setting_it_warns(tmp_path):
    with pytest.warns(UserWarning, match="ignores loss_agg_mode='seq-mean-token-sum'"):
        make_trainer(GRPOTrainer, tmp_path, "dapo",
                     policy_loss_config=PolicyLossConfig(loss_agg_mode="seq-mean-token-sum"))


def test_default_config_warns_nothing(tmp_path):
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="ptr_kernels GRPOTrainer")
        make_trainer(GRPOTrainer, tmp_path, "grpo", policy_loss_config=PolicyLossConfig())
