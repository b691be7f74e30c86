"""verl policy losses backed by `ptr_kernels.policy_loss`: `ptr_cppo`, `ptr_dppo_tv`, `ptr_dppo_kl`, `ptr_vanilla`.

Each function has the signature of a verl 0.9.1 policy loss (note: old_log_prob first):

    fn(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean", config=None,
       rollout_is_weights=None) -> (pg_loss, pg_metrics)

with padded `[B, T]` tensors, a bool or 0/1 float `response_mask`, and verl's actor config (an `ActorConfig`,
a `DictConfig` or a dict). They read the fields verl's own losses read: `clip_ratio`, `clip_ratio_low` /
`clip_ratio_high` (falling back to `clip_ratio`), `clip_ratio_c` (when absent: 3.0, the ActorConfig default; 20
for `ptr_cppo`, as the authors' CPPO) and `global_batch_info` (`dp_size`, `batch_num_tokens`, `global_batch_size`,
`loss_scale_factor`); `ptr_cppo` also reads the `cppo_*` keys of `CPPO_KEYS` (`verl_config.CPPOPolicyLossConfig`
carries them through verl's strict config classes). The metrics carry verl's keys and definitions
(docs/integrations.md), as 0-dim tensors.

This module never imports verl; `register()` does, to add the losses to verl's `POLICY_LOSS_REGISTRY`
(the `verl.plugins` entry point calls it through `ptr_kernels.integrations.verl_plugin`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import MISSING, is_dataclass
from dataclasses import fields as dataclass_fields
from typing import Optional

import torch

from ..api import policy_loss
from ..config import resolve_config

# verl's ActorConfig default; verl's DPPO losses fall back to 20 only for a config without the field
CLIP_RATIO_C_DEFAULT = 3.0
# verl config key -> PolicyLossConfig field of `ptr_cppo`: the authors' four keys, then this package's options
CPPO_KEYS = {
    "cppo_w_min": "w_min",
    "cppo_delta_b": "delta_b",
    "cppo_delta_b_q": "delta_b_quantile",
    "cppo_delta_b_k": "delta_b_quantile_scale",
    "cppo_delta_b_max_mult": "delta_b_max_mult",
    "cppo_length_mode": "length_mode",
    "cppo_w_len_mode": "length_mode",  # the same option as named in a later layout of the authors' keys
    "cppo_gate": "gate",
    "cppo_divergence": "divergence",
    "cppo_surrogate": "surrogate",
}
# `ptr_cppo` without keys is the authors' verl CPPO (docs/math.md section 11): Binary-TV, positions over the padded
# width, the detached capped ratio times log_prob; the other fields keep PolicyLossConfig's defaults (w_min 0.8,
# delta_b 0.02, q 0.9, k 1, max multiple 2, hard gate, log-ratio clamp 20)
CPPO_DEFAULTS = {"length_mode": "padded", "surrogate": "logp"}
# the authors' CPPO caps the ratio at 20 for a config without clip_ratio_c (verl's ActorConfig has 3.0)
CPPO_CLIP_RATIO_C_DEFAULT = 20.0


def _config_get(config, key: str, default=None):
    """`config.get(key)` on an ActorConfig, DictConfig or dict; `default` where the key is absent or None."""
    if config is None:
        raise ValueError("config is required: pass verl's actor config (ActorConfig, DictConfig or dict)")
    value = config.get(key, None)
    return default if value is None else value


def _clip_range(config) -> tuple[float, float, float]:
    """(clip_ratio, low, high) as verl reads them: the sides fall back to clip_ratio."""
    clip_ratio = _config_get(config, "clip_ratio")
    if clip_ratio is None:
        raise ValueError("config.clip_ratio is required (verl's actor config has it, default 0.2)")
    return (float(clip_ratio), float(_config_get(config, "clip_ratio_low", clip_ratio)),
            float(_config_get(config, "clip_ratio_high", clip_ratio)))


def _normalizers(config, loss_agg_mode: str) -> tuple[dict, Optional[float]]:
    """verl's `config.global_batch_info` as `policy_loss` keywords, and its loss_scale_factor."""
    info = dict(_config_get(config, "global_batch_info", {}))
    unknown = sorted(set(info) - {"dp_size", "batch_num_tokens", "global_batch_size", "loss_scale_factor"})
    if unknown:
        raise ValueError(f"config.global_batch_info has unknown key(s) {unknown}")
    dp_size = info.get("dp_size") or 1
    # verl's agg_loss refuses a local count with dp_size > 1 (the gradient would depend on the split)
    if dp_size > 1 and loss_agg_mode == "token-mean" and info.get("batch_num_tokens") is None:
        raise ValueError("config.global_batch_info: batch_num_tokens is required when dp_size > 1")
    if dp_size > 1 and loss_agg_mode.startswith("seq-mean") and info.get("global_batch_size") is None:
        raise ValueError("config.global_batch_info: global_batch_size is required when dp_size > 1")
    keywords = dict(dp_size=dp_size, batch_num_tokens=info.get("batch_num_tokens"),
                    global_batch_size=info.get("global_batch_size"))
    scale = info.get("loss_scale_factor")
    return keywords, None if scale is None else float(scale)


def _run(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config, rollout_is_weights,
         **fields):
    """`policy_loss` with verl's argument order and normalizers; `fields` are PolicyLossConfig fields."""
    keywords, loss_scale_factor = _normalizers(config, loss_agg_mode)
    loss_config = resolve_config(None, dict(fields, loss_agg_mode=loss_agg_mode,
                                                      loss_scale_factor=loss_scale_factor))
    return policy_loss(log_prob, old_log_prob, advantages, response_mask, config=loss_config,
                       rollout_is_weights=rollout_is_weights, **keywords)


def _masked_mean(flags: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """verl_F.masked_mean of 0/1 flags: masked sum / (mask count + 1e-8), 0-dim."""
    flags = torch.where(mask, flags.to(torch.float32), 0.0)
    return flags.sum() / (mask.sum() + 1e-8)


@torch.no_grad()
def _dppo_verl_metrics(old_log_prob, log_prob, advantages, mask, divergence: str, low: float, high: float,
                       clip_ratio_c: float) -> dict:
    """verl's `pg_clipfrac` and `pg_clipfrac_lower` of compute_policy_loss_dppo_tv / _kl, computed verl's way.

    They need two things the fused loss does not report: verl's keep mask treats A == 0 like A < 0 (a
    zero-advantage token below mu - low counts as clipped; its loss is 0 either way), and `pg_clipfrac_lower`
    counts kept tokens whose ratio exceeds the truncation cap. Eager elementwise ops on `[B, T]`, no host sync.
    """
    mask = mask.bool()
    # masked positions may hold anything (inf, NaN): give them a harmless value before any arithmetic
    log_prob = torch.where(mask, log_prob.detach(), 0.0)
    old_log_prob = torch.where(mask, old_log_prob, 0.0)
    ratio = torch.exp(torch.clamp(log_prob - old_log_prob, -20.0, 20.0))
    prob, old_prob = torch.exp(log_prob), torch.exp(old_log_prob)
    if divergence == "tv":
        keep_positive = (prob - old_prob) <= high
        keep_negative = (prob - old_prob) >= -low
    else:
        kl = old_prob * (old_log_prob - log_prob) + (1 - old_prob) * torch.log(
            (1.0 - old_prob + 1e-8) / (1.0 - prob + 1e-8))
        keep_positive = (kl <= high) | (prob <= old_prob)
        keep_negative = (kl <= low) | (prob >= old_prob)
    keep = torch.where(advantages > 0, keep_positive, keep_negative)
    return {"actor/pg_clipfrac": _masked_mean(~keep, mask),
            "actor/pg_clipfrac_lower": _masked_mean((ratio > clip_ratio_c) & keep, mask)}


def compute_policy_loss_vanilla(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean",
                                config=None, rollout_is_weights=None):
    """verl's `vanilla` (PPO clip, clip-higher, dual clip with `clip_ratio_c`) on the fused kernel.

    Metrics: `actor/pg_clipfrac` (clipped low or high), `actor/ppo_kl`, `actor/pg_clipfrac_lower` (the dual
    clip binds), each a mean over valid tokens.
    """
    _, low, high = _clip_range(config)
    loss, metrics = _run(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
                         rollout_is_weights, method="ppo", clip_ratio_low=low, clip_ratio_high=high,
                         clip_ratio_c=float(_config_get(config, "clip_ratio_c", CLIP_RATIO_C_DEFAULT)))
    return loss, {"actor/pg_clipfrac": metrics["clip_frac_low"] + metrics["clip_frac_high"],
                  "actor/ppo_kl": metrics["ppo_kl"],
                  "actor/pg_clipfrac_lower": metrics["clip_frac_dual"]}


def _dppo(divergence: str, old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
          rollout_is_weights):
    delta, low, high = _clip_range(config)
    clip_ratio_c = float(_config_get(config, "clip_ratio_c", CLIP_RATIO_C_DEFAULT))
    # verl's DPPO loss is -A sg(min(r, clip_ratio_c)) log_prob M: our "logp" surrogate with ratio_cap
    loss, metrics = _run(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
                         rollout_is_weights, method="dppo", divergence=f"binary_{divergence}", delta=delta,
                         delta_low=low, delta_high=high, surrogate="logp", ratio_cap=clip_ratio_c)
    verl_metrics = _dppo_verl_metrics(old_log_prob, log_prob, advantages, response_mask, divergence, low, high,
                                      clip_ratio_c)
    return loss, {"actor/pg_clipfrac": verl_metrics["actor/pg_clipfrac"], "actor/ppo_kl": metrics["ppo_kl"],
                  "actor/pg_clipfrac_lower": verl_metrics["actor/pg_clipfrac_lower"]}


def compute_policy_loss_dppo_tv(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean",
                                config=None, rollout_is_weights=None):
    """verl's `dppo_tv` (DPPO Binary-TV): `clip_ratio*` are the TV thresholds, `clip_ratio_c` the ratio cap."""
    return _dppo("tv", old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
                 rollout_is_weights)


def compute_policy_loss_dppo_kl(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean",
                                config=None, rollout_is_weights=None):
    """verl's `dppo_kl` (DPPO Binary-KL): `clip_ratio*` are the KL thresholds, `clip_ratio_c` the ratio cap."""
    return _dppo("kl", old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
                 rollout_is_weights)


def _is_section(value) -> bool:
    return isinstance(value, Mapping) or is_dataclass(value) or hasattr(value, "keys")


def _cppo_sections(config) -> list:
    """Where `cppo_*` keys may be, as (name, section): `config.policy_loss` (the authors' place, and
    `CPPOPolicyLossConfig`'s), the actor config itself (a dict or DictConfig), and the sub-section `cppo` of
    either (a later layout of the authors' keys)."""
    sections = []
    policy_loss = config.get("policy_loss", None)
    for where, section in (("policy_loss", policy_loss), ("actor", config)):
        if not _is_section(section):
            continue
        sections.append((where, section))
        nested = section.get("cppo", None)
        if nested is not None:
            if not _is_section(nested):
                raise ValueError(f"{where}.cppo must be a section of cppo_* keys, got {nested!r}")
            sections.append((f"{where}.cppo", nested))
    return sections


def cppo_fields(config) -> dict:
    """PolicyLossConfig fields of `ptr_cppo` from verl's actor config: delta = `clip_ratio`, ratio_cap =
    `clip_ratio_c` (20 where absent), the authors' defaults (`CPPO_DEFAULTS`), and the `cppo_*` keys of `CPPO_KEYS`
    from `config.policy_loss`, the actor config, or a `cppo` sub-section of either. An unknown `cppo_*` key (every key
    of the `cppo` sub-section must be one), or one option given in two places with two values, is a ValueError
    naming it; a key set to None is None (`cppo_delta_b_q: null` keeps delta_b fixed)."""
    delta, _, _ = _clip_range(config)
    fields = dict(CPPO_DEFAULTS, method="cppo", delta=delta,
                  ratio_cap=float(_config_get(config, "clip_ratio_c", CPPO_CLIP_RATIO_C_DEFAULT)))
    given = {}  # field -> (where, key, value)
    for where, section in _cppo_sections(config):
        for key in _keys(section):
            in_cppo_section = where.endswith(".cppo")
            if key == "cppo" and not in_cppo_section:
                continue
            if not in_cppo_section and not (isinstance(key, str) and key.startswith("cppo_")):
                continue
            if key not in CPPO_KEYS:
                raise ValueError(f"unknown ptr_cppo option {where}.{key}; valid options: {', '.join(CPPO_KEYS)}")
            field, value = CPPO_KEYS[key], cppo_value(key, section.get(key))
            if field in given and given[field][2] != value:
                first_where, first_key, first_value = given[field]
                raise ValueError(f"{first_where}.{first_key}={first_value!r} and {where}.{key}={value!r} set one "
                                 "option twice: set it in one place")
            given.setdefault(field, (where, key, value))
    fields.update({field: value for field, (_, _, value) in given.items()})
    return fields


def _keys(section) -> list:
    """The keys of a dict or DictConfig; of a verl config dataclass (a Mapping of its fields) the fields set away
    from their default (a default of `CPPOPolicyLossConfig` is the authors' default, not a choice)."""
    if is_dataclass(section):
        return [f.name for f in dataclass_fields(section) if f.default is MISSING
                or getattr(section, f.name) != f.default]
    return list(section.keys())


def cppo_value(key: str, value):
    """A `cppo_*` value as the PolicyLossConfig field takes it: verl-style "tv" / "kl" divergences, an int horizon
    given as a string (a command-line override)."""
    if key == "cppo_divergence" and value in ("tv", "kl"):
        return "binary_" + value
    if CPPO_KEYS[key] == "length_mode" and isinstance(value, str) and value.isdigit():
        return int(value)
    return value


def compute_policy_loss_cppo(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean",
                             config=None, rollout_is_weights=None):
    """The authors' verl CPPO (docs/math.md section 11) on the fused kernel, with this package's options as further
    `cppo_*` keys (docs/integrations.md).

    Metrics: verl's `actor/pg_clipfrac` (rejected fraction of the valid tokens), `actor/ppo_kl`,
    `actor/pg_clipfrac_lower` (kept tokens whose ratio exceeds `clip_ratio_c`), and CPPO's own
    `actor/cppo/mask_frac_token`, `.../mask_frac_budget`, `.../delta_b_mean`, `.../divergence_mean`.
    """
    loss, metrics = _run(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
                         rollout_is_weights, **cppo_fields(config))
    out = {"actor/pg_clipfrac": metrics["mask_frac"], "actor/ppo_kl": metrics["ppo_kl"],
           "actor/pg_clipfrac_lower": metrics["ratio_cap_frac"]}
    for name in ("mask_frac_token", "mask_frac_budget", "delta_b_mean", "divergence_mean"):
        out[f"actor/cppo/{name}"] = metrics[name]
    return loss, out


POLICY_LOSSES = {
    "ptr_cppo": compute_policy_loss_cppo,
    "ptr_dppo_tv": compute_policy_loss_dppo_tv,
    "ptr_dppo_kl": compute_policy_loss_dppo_kl,
    "ptr_vanilla": compute_policy_loss_vanilla,
}


def register() -> None:
    """Add the four losses to verl's `POLICY_LOSS_REGISTRY` (idempotent). Imports verl."""
    from verl.trainer.ppo.core_algos import register_policy_loss

    for name, fn in POLICY_LOSSES.items():
        register_policy_loss(name)(fn)
