"""ptr_kernels.integrations.verl against the real verl 0.9.1 package (the `verl` extra).

verl's own compute_policy_loss_vanilla / _dppo_tv / _dppo_kl against ours: loss, gradient and metrics within
1e-5 relative, for every loss_agg_mode, with verl's global batch info given and absent, and with rows whose
advantage is zero (verl counts those tokens in its DPPO clip fraction). ptr_cppo through verl's registry
against the reference backend of ptr_kernels.policy_loss.
"""

import importlib.util
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

# skipped only where verl is not installed at all; a broken install fails here instead of skipping
if importlib.util.find_spec("verl") is None:
    pytest.skip("needs the verl extra: pip install -c .ci/constraints.txt -e '.[verl]'",
                allow_module_level=True)

from verl.trainer.ppo import core_algos  # noqa: E402
from verl.workers.config import ActorConfig  # noqa: E402

from ptr_kernels import PolicyLossConfig, policy_loss  # noqa: E402
from ptr_kernels.integrations import verl as ptr_verl  # noqa: E402

RTOL = 1e-5
AGG_MODES = ("token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
# verl's config.global_batch_info: absent (local counts) or the global normalizers of a split batch
BATCH_INFOS = {
    "absent": {},
    "global": dict(dp_size=4, batch_num_tokens=517, global_batch_size=24, loss_scale_factor=64),
}
PAIRS = [("vanilla", "ptr_vanilla"), ("dppo_tv", "ptr_dppo_tv"), ("dppo_kl", "ptr_dppo_kl")]


def actor_config(global_batch_info=None, **fields):
    """verl's own ActorConfig (the defaults a verl user gets: clip_ratio 0.2, clip_ratio_c 3.0)."""
    config = ActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1, **fields)
    config.global_batch_info.update(global_batch_info or {})
    return config


def make_batch(seed, B=6, T=32):
    """Padded float32 inputs: right padding, holes, an empty row, large moves, two zero-advantage rows."""
    rng = np.random.default_rng(seed)
    old = -rng.exponential(0.7, size=(B, T))
    move = rng.normal(0, 0.3, size=(B, T)) * np.where(rng.random((B, T)) < 0.1, 8, 1)
    lp = np.minimum(old + move, -1e-4)
    adv = np.repeat(rng.choice([-1, 1], size=(B, 1)) * rng.uniform(0.1, 2.0, size=(B, 1)), T, axis=1)
    adv[1] = 0.0
    adv[4] = 0.0
    lengths = rng.integers(1, T + 1, size=B)
    lengths[seed % B] = 0
    mask = (np.arange(T)[None, :] < lengths[:, None]) & (rng.random((B, T)) > 0.1)
    f = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
    return f(lp), f(old), f(adv), torch.from_numpy(mask)


def run(fn, lp, olp, adv, mask, mode, config, weights=None):
    """(loss, d loss / d log_prob, metrics as floats) of a verl-signature policy loss."""
    lp = lp.clone().requires_grad_(True)
    loss, metrics = fn(olp, lp, adv, mask, loss_agg_mode=mode, config=config, rollout_is_weights=weights)
    (grad,) = torch.autograd.grad(loss, lp)
    return loss.detach(), grad, {k: float(v) for k, v in metrics.items()}


def assert_close(ours, theirs):
    (loss, grad, metrics), (v_loss, v_grad, v_metrics) = ours, theirs
    torch.testing.assert_close(loss, v_loss, rtol=RTOL, atol=1e-7)
    torch.testing.assert_close(grad, v_grad, rtol=RTOL, atol=1e-9)
    assert set(metrics) == set(v_metrics)
    for key in v_metrics:
        assert metrics[key] == pytest.approx(v_metrics[key], rel=RTOL, abs=1e-7), key


@pytest.mark.parametrize("verl_name,ours_name", PAIRS)
@pytest.mark.parametrize("mode", AGG_MODES)
@pytest.mark.parametrize("info", sorted(BATCH_INFOS))
@pytest.mark.parametrize("seed", range(3))
def test_parity_with_verl(verl_name, ours_name, mode, info, seed):
    lp, olp, adv, mask = make_batch(seed)
    fields = dict(clip_ratio=0.2, clip_ratio_high=0.28) if verl_name == "vanilla" else dict(clip_ratio=0.15)
    config = actor_config(BATCH_INFOS[info], **fields)
    theirs = run(core_algos.get_policy_loss_fn(verl_name), lp, olp, adv, mask, mode, config)
    ours = run(core_algos.get_policy_loss_fn(ours_name), lp, olp, adv, mask, mode, config)
    assert_close(ours, theirs)
    assert theirs[1].abs().sum() > 0  # the case moves something


@pytest.mark.parametrize("verl_name,ours_name", PAIRS)
def test_parity_float_mask_rollout_weights_and_clip_ratio_c(verl_name, ours_name):
    lp, olp, adv, mask = make_batch(7)
    weights = torch.rand(lp.shape, generator=torch.Generator().manual_seed(0)) + 0.5
    config = actor_config(clip_ratio=0.1, clip_ratio_low=0.05, clip_ratio_high=0.3, clip_ratio_c=1.5)
    args = (lp, olp, adv, mask.float(), "seq-mean-token-mean", config, weights)
    assert_close(run(core_algos.get_policy_loss_fn(ours_name), *args),
                 run(core_algos.get_policy_loss_fn(verl_name), *args))


def test_dppo_counts_zero_advantage_tokens_as_verl_does():
    # one zero-advantage token that moved down by more than clip_ratio: verl counts it as clipped
    olp = torch.log(torch.tensor([[0.5, 0.5]]))
    lp = torch.log(torch.tensor([[0.2, 0.5]]))
    adv = torch.zeros(1, 2)
    mask = torch.ones(1, 2, dtype=torch.bool)
    config = actor_config(clip_ratio=0.15)
    _, metrics = ptr_verl.compute_policy_loss_dppo_tv(olp, lp, adv, mask, config=config)
    assert metrics["actor/pg_clipfrac"].item() == pytest.approx(0.5)
    _, v_metrics = core_algos.compute_policy_loss_dppo_tv(olp, lp, adv, mask, config=config)
    assert v_metrics["actor/pg_clipfrac"] == pytest.approx(0.5)


@pytest.mark.parametrize("mode", AGG_MODES)
@pytest.mark.parametrize("info", sorted(BATCH_INFOS))
def test_ptr_cppo_through_verl_registry_matches_reference(mode, info):
    lp, olp, adv, mask = make_batch(3)
    config = actor_config(BATCH_INFOS[info], clip_ratio=0.15)
    loss, grad, metrics = run(core_algos.get_policy_loss_fn("ptr_cppo"), lp, olp, adv, mask, mode, config)
    gbi = dict(BATCH_INFOS[info])
    scale = gbi.pop("loss_scale_factor", None)
    ref_lp = lp.clone().requires_grad_(True)
    # the authors' verl CPPO: positions over the padded width, the ratio capped at clip_ratio_c (ActorConfig: 3.0)
    # times log_prob
    ref_loss, ref_metrics = policy_loss(ref_lp, olp, adv, mask, backend="reference", **gbi,
                                        config=PolicyLossConfig(delta=0.15, length_mode="padded", surrogate="logp",
                                                                ratio_cap=3.0, loss_agg_mode=mode,
                                                                loss_scale_factor=scale))
    (ref_grad,) = torch.autograd.grad(ref_loss, ref_lp)
    torch.testing.assert_close(loss, ref_loss.detach(), rtol=RTOL, atol=1e-7)
    torch.testing.assert_close(grad, ref_grad, rtol=RTOL, atol=1e-9)
    assert metrics["actor/pg_clipfrac"] == pytest.approx(ref_metrics["mask_frac"].item(), rel=RTOL)
    assert metrics["actor/cppo/mask_frac_budget"] == pytest.approx(ref_metrics["mask_frac_budget"].item(), rel=RTOL)
    assert metrics["actor/pg_clipfrac_lower"] == pytest.approx(ref_metrics["ratio_cap_frac"].item(), rel=RTOL)
    assert ref_metrics["mask_frac"].item() > 0  # the case exercises the mask


def test_ptr_cppo_reads_cppo_keys():
    lp, olp, adv, mask = make_batch(5)
    options = dict(cppo_w_min=0.6, cppo_delta_b=0.01, cppo_delta_b_q=None, cppo_length_mode="sequence",
                   cppo_gate="soft", cppo_divergence="kl", cppo_surrogate="ratio")
    config = {"clip_ratio": 0.1, "global_batch_info": {}, **options}  # a plain dict works like a DictConfig
    loss, grad, _ = run(core_algos.get_policy_loss_fn("ptr_cppo"), lp, olp, adv, mask, "token-mean", config)
    expected = dict(method="cppo", delta=0.1, w_min=0.6, delta_b=0.01, delta_b_quantile=None, ratio_cap=20.0,
                    length_mode="sequence", gate="soft", divergence="binary_kl", surrogate="ratio")
    assert ptr_verl.cppo_fields(config) == expected
    ref_lp = lp.clone().requires_grad_(True)
    ref_loss, _ = policy_loss(ref_lp, olp, adv, mask, backend="reference", **expected)
    (ref_grad,) = torch.autograd.grad(ref_loss, ref_lp)
    torch.testing.assert_close(loss, ref_loss.detach(), rtol=RTOL, atol=1e-7)
    torch.testing.assert_close(grad, ref_grad, rtol=RTOL, atol=1e-9)


def test_global_normalizers_required_with_dp_size_as_in_verl():
    lp, olp, adv, mask = make_batch(0)
    config = actor_config({"dp_size": 2}, clip_ratio=0.2)
    for name in ("vanilla", "ptr_vanilla"):
        with pytest.raises(ValueError, match="batch_num_tokens"):
            core_algos.get_policy_loss_fn(name)(olp, lp, adv, mask, "token-mean", config)


def test_import_ptr_kernels_does_not_import_verl_and_import_verl_registers():
    code = ("import sys, ptr_kernels, ptr_kernels.integrations, ptr_kernels.integrations.verl\n"
            "assert 'verl' not in sys.modules and 'trl' not in sys.modules, sorted(sys.modules)\n"
            "import verl\n"
            "from verl.trainer.ppo.core_algos import POLICY_LOSS_REGISTRY as R\n"
            "assert {'ptr_cppo', 'ptr_dppo_tv', 'ptr_dppo_kl', 'ptr_vanilla'} <= set(R), sorted(R)\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


# ---- ptr_cppo's options through verl's own Hydra config, exactly as docs/integrations.md shows them ----

DOCS = pathlib.Path(__file__).resolve().parents[2] / "docs" / "integrations.md"


def _docs_block(language: str, marker: str) -> str:
    """The fenced `language` block of docs/integrations.md that contains `marker`."""
    blocks = re.findall(rf"```{language}\n(.*?)```", DOCS.read_text(), flags=re.S)
    (block,) = [b for b in blocks if marker in b]
    return block


def _actor_from_docs_command():
    """verl's ppo_trainer.yaml composed with the overrides of the documented command line."""
    from hydra import compose, initialize_config_dir
    from verl.utils.config import omega_conf_to_dataclass

    command = _docs_block("bash", "CPPOPolicyLossConfig")
    overrides = [token for token in command.split() if "=" in token and token.lstrip("+").startswith("actor_")]
    assert any("cppo_w_min=0.7" in token for token in overrides)
    config_dir = pathlib.Path(core_algos.__file__).resolve().parents[1] / "config"
    with initialize_config_dir(config_dir=str(config_dir), version_base=None):
        config = compose("ppo_trainer", overrides=overrides)
    return omega_conf_to_dataclass(config.actor_rollout_ref.actor)


def _actor_from_docs_yaml(tmp_path):
    from hydra import compose, initialize_config_dir
    from verl.utils.config import omega_conf_to_dataclass

    (tmp_path / "my_cppo.yaml").write_text(_docs_block("yaml", "CPPOPolicyLossConfig"))
    with initialize_config_dir(config_dir=str(tmp_path), version_base=None):
        config = compose("my_cppo")
    return omega_conf_to_dataclass(config.actor_rollout_ref.actor)


@pytest.mark.parametrize("source", ["command", "yaml"])
def test_docs_verl_config_runs_ptr_cppo_with_cppo_w_min(source, tmp_path):
    from ptr_kernels.integrations.verl_config import CPPOPolicyLossConfig

    actor = _actor_from_docs_command() if source == "command" else _actor_from_docs_yaml(tmp_path)
    assert isinstance(actor.policy_loss, CPPOPolicyLossConfig) and actor.policy_loss.cppo_w_min == 0.7
    lp, olp, adv, mask = make_batch(0)
    loss_fn = core_algos.get_policy_loss_fn(actor.policy_loss.loss_mode)
    loss, grad, metrics = run(loss_fn, lp, olp, adv, mask, "token-mean", actor)
    ref_lp = lp.clone().requires_grad_(True)
    ref_loss, _ = policy_loss(ref_lp, olp, adv, mask, backend="reference", method="cppo", delta=0.15, w_min=0.7,
                              length_mode="padded", surrogate="logp", ratio_cap=20.0)
    (ref_grad,) = torch.autograd.grad(ref_loss, ref_lp)
    torch.testing.assert_close(loss, ref_loss.detach(), rtol=RTOL, atol=1e-7)
    torch.testing.assert_close(grad, ref_grad, rtol=RTOL, atol=1e-9)
    # the key was read: with verl's own policy-loss section (w_min 0.8) the token threshold rejects more here
    _, _, default_metrics = run(loss_fn, lp, olp, adv, mask, "token-mean", actor_config(clip_ratio=0.15,
                                                                                       clip_ratio_c=20.0))
    assert metrics["actor/cppo/mask_frac_token"] < default_metrics["actor/cppo/mask_frac_token"]


def test_verl_config_refuses_a_misspelt_or_bad_cppo_key():
    from hydra.errors import HydraException

    from ptr_kernels.integrations.verl_config import CPPOPolicyLossConfig

    # the dataclass's defaults are not choices: an actor-level key of a dict config still applies
    assert ptr_verl.cppo_fields({"clip_ratio": 0.2, "cppo_w_min": 0.6,
                                 "policy_loss": CPPOPolicyLossConfig()})["w_min"] == 0.6
    with pytest.raises(TypeError, match="cppo_w_mn"):
        CPPOPolicyLossConfig(cppo_w_mn=0.7)
    with pytest.raises(ValueError, match="policy_loss.cppo_delta_b_k"):
        CPPOPolicyLossConfig(cppo_delta_b_k=-1.0)
    with pytest.raises(HydraException, match="cppo_w_mn"):  # verl's conversion of a composed config
        from hydra import compose, initialize_config_dir
        from verl.utils.config import omega_conf_to_dataclass
        config_dir = pathlib.Path(core_algos.__file__).resolve().parents[1] / "config"
        with initialize_config_dir(config_dir=str(config_dir), version_base=None):
            config = compose("ppo_trainer", overrides=[
                "actor_rollout_ref.actor.policy_loss._target_="
                "ptr_kernels.integrations.verl_config.CPPOPolicyLossConfig",
                "+actor_rollout_ref.actor.policy_loss.cppo_w_mn=0.7",
                "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=4"])
        omega_conf_to_dataclass(config.actor_rollout_ref.actor)
