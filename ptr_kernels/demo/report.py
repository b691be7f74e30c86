"""The demo's outputs: PNG plots (matplotlib, Agg), a summary table (markdown and CSV) and per-step CSVs."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from .train import DemoResult

COLORS = {"cppo": "C0", "dppo": "C1", "ppo": "C2"}
SMOOTHING_STEPS = 5  # trailing window of the smoothed curves
FINAL_STEPS = 10  # the "final rollout reward" is the mean over this many last steps (all of a shorter run)


def _trailing_mean(values) -> np.ndarray:
    """Mean over the last SMOOTHING_STEPS finite values up to each step (NaN entries are skipped)."""
    values = np.asarray(values, dtype=float)
    out = np.full_like(values, np.nan)
    for i in range(len(values)):
        window = values[max(0, i - SMOOTHING_STEPS + 1):i + 1]
        if np.isfinite(window).any():
            out[i] = np.nanmean(window)
    return out


def budget_share(method_result) -> np.ndarray:
    """Per step: mask_frac_budget / mask_frac, the share of rejections due to the prefix budget (NaN if none)."""
    rejected = np.asarray(method_result.mask_frac, dtype=float)
    budget = np.asarray(method_result.mask_frac_budget, dtype=float)
    return np.divide(budget, rejected, out=np.full_like(rejected, np.nan), where=rejected > 0)


def rejection_by_position(method_result, parts=("token", "budget")) -> np.ndarray:
    """Rejection rate per response position `[MAX_RESPONSE_LEN]` over every update (NaN where no token was valid)."""
    rejected = sum(getattr(method_result, f"rejected_{part}_by_position").double() for part in parts).numpy()
    valid = method_result.valid_by_position.double().numpy()
    return np.divide(rejected, valid, out=np.full_like(valid, np.nan), where=valid > 0)


def plot_reward(ax, result: DemoResult) -> None:
    for name, res in result.methods.items():
        steps = np.arange(1, len(res.reward) + 1)
        ax.plot(steps, res.reward, color=COLORS[name], alpha=0.2, linewidth=0.8)
        ax.plot(steps, _trailing_mean(res.reward), color=COLORS[name], label=f"{name} (held-out {res.eval_reward:.2f})")
    ax.axhline(result.warm_start_eval_reward, color="gray", linestyle="--",
               label=f"supervised only (held-out {result.warm_start_eval_reward:.2f})")
    ax.set(xlabel="RL step", ylabel="rollout reward (exact match)", ylim=(0, 1.02),
           title=f"Reward ({SMOOTHING_STEPS}-step mean)")
    ax.legend(fontsize=8, loc="lower right")


def plot_rejection_by_position(ax, result: DemoResult) -> None:
    # late positions exist only in long responses: gray bars show how many tokens each rate rests on
    first = next(iter(result.methods.values()))
    valid = first.valid_by_position.double().numpy()
    bars = ax.twinx()
    bars.bar(np.arange(1, len(valid) + 1), valid / max(valid[0], 1), color="gray", alpha=0.15)
    bars.set(ylim=(0, 1.05), ylabel="valid tokens at t, share of t = 1 (gray bars)")
    ax.set_zorder(bars.get_zorder() + 1)
    ax.patch.set_visible(False)
    for name, res in result.methods.items():
        positions = np.arange(1, len(res.valid_by_position) + 1)
        ax.plot(positions, rejection_by_position(res), color=COLORS[name], marker="o", markersize=3, label=name)
        if name == "cppo":
            ax.plot(positions, rejection_by_position(res, parts=("token",)), color=COLORS[name], linestyle="--",
                    label="cppo: token threshold only")
    ax.set(xlabel="response position t", ylabel="rejected share of valid tokens",
           title="Rejections by position (all updates)")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)


def plot_budget_share(ax, result: DemoResult) -> None:
    res = result.methods.get("cppo")
    if res is None:
        ax.text(0.5, 0.5, "cppo was not run", ha="center", transform=ax.transAxes)
        return
    steps = np.arange(1, len(res.mask_frac) + 1)
    share = budget_share(res)
    ax.plot(steps, share, color=COLORS["cppo"], alpha=0.3, linestyle="none", marker=".")
    ax.plot(steps, _trailing_mean(share), color=COLORS["cppo"], label="cppo")
    ax.set(xlabel="RL step", ylabel="mask_frac_budget / mask_frac", ylim=(0, 1.02),
           title="CPPO: prefix budget's share of rejections")
    ax.legend(fontsize=8)


def plot_mask_frac(ax, result: DemoResult) -> None:
    for name, res in result.methods.items():
        steps = np.arange(1, len(res.mask_frac) + 1)
        ax.plot(steps, _trailing_mean(res.mask_frac), color=COLORS[name], label=name)
    ax.set(xlabel="RL step", ylabel="mask_frac (mean over the step's updates)",
           title=f"Rejection rate ({SMOOTHING_STEPS}-step mean)")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)


def summary_rows(result: DemoResult) -> list:
    """One dict per method: the table's columns."""
    rows = []
    for name, res in result.methods.items():
        rejected = res.rejected_token_by_position.sum() + res.rejected_budget_by_position.sum()
        rows.append({
            "method": name,
            "supervised_only_reward": round(result.warm_start_eval_reward, 4),
            "final_reward": round(res.eval_reward, 4),
            "final_rollout_reward": round(float(np.mean(res.reward[-FINAL_STEPS:])), 4),
            "mean_mask_frac": round(float(np.mean(res.mask_frac)), 4),
            "budget_share": round(float(res.rejected_budget_by_position.sum() / rejected), 4) if rejected else 0.0,
            "tokens_per_s": round(res.trained_tokens / res.seconds, 1),
        })
    return rows


def markdown_table(rows: list, final_steps: int) -> str:
    """The summary table; `final_steps`: how many last steps the rollout reward averages."""
    header = ("| method | held-out exact match: supervised only -> after RL | rollout reward, last "
              f"{final_steps} steps | mean mask_frac | budget share of rejections | tokens/s |")
    lines = [header, "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['supervised_only_reward']:.3f} -> {r['final_reward']:.3f} | "
                     f"{r['final_rollout_reward']:.3f} | {r['mean_mask_frac']:.4f} | {r['budget_share']:.2f} | "
                     f"{r['tokens_per_s']:.0f} |")
    return "\n".join(lines) + "\n"


def _write_csv(path: Path, rows: list) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def write_report(result: DemoResult, out: Path) -> dict:
    """Write the plots, `summary.md`/`summary.csv`, `history.csv` and `positions.csv` into `out`.

    Returns `{"table": markdown, "files": [paths]}`.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    files = []
    for filename, draw in [("reward.png", plot_reward), ("rejection_by_position.png", plot_rejection_by_position)]:
        fig, ax = plt.subplots(figsize=(6, 4), layout="constrained")
        draw(ax, result)
        files.append(_save(fig, out / filename))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), layout="constrained")
    plot_mask_frac(axes[0], result)
    plot_budget_share(axes[1], result)
    files.append(_save(fig, out / "budget_share.png"))
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.4), layout="constrained")
    for ax, draw in zip(axes, (plot_reward, plot_rejection_by_position, plot_budget_share)):
        draw(ax, result)
    c = result.config
    fig.suptitle(f"ptr-kernels demo: sorted distinct digits, seed {c.seed}, {c.steps} steps x "
                 f"{c.prompts_per_step}x{c.group_size} rollouts, {c.updates_per_batch} updates per batch")
    files.append(_save(fig, out / "demo.png"))

    rows = summary_rows(result)
    table = markdown_table(rows, min(FINAL_STEPS, c.steps))
    (out / "summary.md").write_text(table)
    _write_csv(out / "summary.csv", rows)
    _write_csv(out / "history.csv", [
        {"method": name, "step": i + 1, "rollout_reward": res.reward[i], "mask_frac": res.mask_frac[i],
         "mask_frac_budget": res.mask_frac_budget[i]}
        for name, res in result.methods.items() for i in range(len(res.reward))])
    _write_csv(out / "positions.csv", [
        {"method": name, "position": t + 1, "valid": int(res.valid_by_position[t]),
         "rejected_token": int(res.rejected_token_by_position[t]),
         "rejected_budget": int(res.rejected_budget_by_position[t])}
        for name, res in result.methods.items() for t in range(len(res.valid_by_position))])
    files += [out / name for name in ("summary.md", "summary.csv", "history.csv", "positions.csv")]
    return {"table": table, "files": files}


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
