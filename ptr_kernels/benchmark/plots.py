"""The plots of a sweep: time per call vs tokens, and the speedup of the fused kernel over each other provider."""

from __future__ import annotations

from pathlib import Path

from .providers import PROVIDERS
from .targets import index_rows, p50, shapes_of
from .workloads import LAYOUTS, METHODS, MODES

COLORS = dict(zip(PROVIDERS, ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple")))


def shape_names(rows, layout) -> list:
    """Names of the shapes of a layout that have timings, by token count."""
    return [name for _, _, name in shapes_of(rows, layout)]


def plots(rows, out: Path) -> list:
    """Per (method, mode): time vs tokens (log-log, one line per provider and timing, p20-p80 band, one panel per
    layout) and speedup bars of the fused kernel (or, without it, the eager reference) over each other provider."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    index = index_rows(rows)
    device = rows[0]["device"] if rows else ""
    written = []
    providers = [p for p in PROVIDERS if any(r["provider"] == p and r["metric"] == "time_us" for r in rows)]
    base = "fused" if "fused" in providers else "eager"
    for method in METHODS:
        for mode in MODES:
            layouts = [lay for lay in LAYOUTS if any(p50(index, p, method, lay, s, mode) for p in providers
                                                      for s in shape_names(rows, lay))]
            if not layouts:
                continue
            fig, axes = plt.subplots(1, len(layouts), figsize=(6 * len(layouts), 4.5), squeeze=False)
            for ax, layout in zip(axes[0], layouts):
                # solid: per-call event time (host overhead included when host-bound); dashed: CUDA-graph replay
                for p, metric in [(p, m) for p in providers for m in ("time_us", "graph_us")]:
                    pts = []
                    for s in shape_names(rows, layout):
                        r = index.get((p, method, layout, s, mode, metric))
                        if r:
                            pts.append((int(r["tokens"]), float(r["p20"]), float(r["p50"]), float(r["p80"])))
                    if pts:
                        x, lo, mid, hi = zip(*pts)
                        graph = metric == "graph_us"
                        ax.plot(x, mid, marker="o", label=f"{p} (graph replay)" if graph else p, color=COLORS[p],
                                linestyle="--" if graph else "-", markerfacecolor="none" if graph else None)
                        ax.fill_between(x, lo, hi, alpha=0.2, color=COLORS[p])
                ax.set_xscale("log")
                ax.set_yscale("log")
                ax.set_xlabel("tokens")
                ax.set_ylabel("time per call (us, p50; band p20-p80)")
                ax.set_title(f"{method} {mode} {layout}")
                ax.grid(True, which="both", alpha=0.3)
                ax.legend()
            fig.suptitle(device)
            fig.tight_layout()
            written.append(out / f"time_{method}_{mode}.png")
            fig.savefig(written[-1], dpi=110)
            plt.close(fig)

            bars = []  # (label, {provider: speedup})
            for layout in layouts:
                for s in shape_names(rows, layout):
                    mine = p50(index, base, method, layout, s, mode)
                    ups = {p: p50(index, p, method, layout, s, mode) / mine for p in providers
                           if p != base and mine and p50(index, p, method, layout, s, mode)}
                    if ups:
                        bars.append((f"{layout}\n{s}", ups))
            if not bars:
                continue
            others = [p for p in providers if any(p in ups for _, ups in bars)]
            fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(bars)), 4.5))
            width = 0.8 / len(others)
            for k, p in enumerate(others):
                xs = [i + k * width for i, (_, ups) in enumerate(bars) if p in ups]
                drawn = ax.bar(xs, [ups[p] for _, ups in bars if p in ups], width=width, label=f"vs {p}",
                               color=COLORS[p])
                ax.bar_label(drawn, fmt="%.3g", fontsize=6)
            ax.set_xticks([i + 0.4 - width / 2 for i in range(len(bars))])
            ax.set_xticklabels([label for label, _ in bars], fontsize=7)
            ax.set_yscale("log")
            ax.axhline(1, color="black", linewidth=0.8)
            ax.set_ylabel(f"speedup of {base} (time ratio, p50)")
            ax.set_title(f"{base} vs others: {method} {mode} ({device})")
            ax.legend()
            fig.tight_layout()
            written.append(out / f"speedup_{method}_{mode}.png")
            fig.savefig(written[-1], dpi=110)
            plt.close(fig)
    return written
