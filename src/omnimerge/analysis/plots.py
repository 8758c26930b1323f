"""PNG plots of an analysis: per-layer norms, cosines and sign conflicts; spectra with the rank marked."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any


def _per_layer(tensors: dict[str, Any], value) -> dict[int, float]:
    acc: dict[int, list[float]] = defaultdict(list)
    for stats in tensors.values():
        if stats["layer"] is not None:
            acc[stats["layer"]].append(value(stats))
    return {layer: sum(v) / len(v) for layer, v in sorted(acc.items())}


def _mean_pairwise(cos: list[list[float]]) -> float:
    n = len(cos)
    pairs = [cos[i][j] for i in range(n) for j in range(i + 1, n)]
    return sum(pairs) / len(pairs) if pairs else 1.0


def write_plots(result: dict[str, Any], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tensors, models = result["tensors"], result["models"]
    written = []

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for i, name in enumerate(models):
        per = _per_layer(tensors, lambda s, i=i: s["norms"][i])
        axes[0].plot(list(per), list(per.values()), marker="o", label=name)
    axes[0].set(title="task-vector norm (mean per tensor)", xlabel="layer", ylabel="‖τ‖")
    axes[0].legend(fontsize=7)
    per = _per_layer(tensors, lambda s: _mean_pairwise(s["cosine"]))
    axes[1].plot(list(per), list(per.values()), marker="o")
    axes[1].set(title="mean pairwise cosine of task vectors", xlabel="layer", ylabel="cos")
    per = _per_layer(tensors, lambda s: s["sign_conflict"])
    axes[2].plot(list(per), list(per.values()), marker="o", color="tab:red")
    axes[2].set(title="sign-conflict rate", xlabel="layer", ylabel="fraction of contested entries")
    fig.tight_layout()
    written.append(out / "layers.png")
    fig.savefig(written[-1], dpi=100)
    plt.close(fig)

    n = len(models)
    mean = [[0.0] * n for _ in range(n)]
    for stats in tensors.values():
        for i in range(n):
            for j in range(n):
                mean[i][j] += stats["cosine"][i][j] / max(len(tensors), 1)
    fig, ax = plt.subplots(figsize=(1.2 * n + 3, 1.2 * n + 2))
    im = ax.imshow(mean, vmin=-1, vmax=1, cmap="RdBu_r")
    ax.set_xticks(range(n), models, rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(n), models, fontsize=7)
    for i in range(n):
        for j in range(n):
            ax.text(j, i, f"{mean[i][j]:.2f}", ha="center", va="center", fontsize=8)
    fig.colorbar(im)
    ax.set_title("task-vector cosine (mean over tensors)")
    fig.tight_layout()
    written.append(out / "cosine.png")
    fig.savefig(written[-1], dpi=100)
    plt.close(fig)

    with_spectra = [(k, s) for k, s in tensors.items() if "spectra" in s]
    if with_spectra:
        picks = _representatives(with_spectra)
        fig, axes = plt.subplots(1, len(picks), figsize=(4.5 * len(picks), 3.8), squeeze=False)
        for ax, (key, stats) in zip(axes[0], picks):
            for name, sp in zip(models, stats["spectra"]):
                sv = sp["singular_values"]
                line, = ax.semilogy(range(1, len(sv) + 1), sv, label=name)
                if sp["rank"] <= len(sv):
                    ax.axvline(sp["rank"], color=line.get_color(), ls="--", lw=0.8)
            ax.set(title=key.replace("language.", ""), xlabel=f"index (dashed: {result['rank_rule']} rank)",
                   ylabel="σ")
            ax.title.set_fontsize(8)
        axes[0][0].legend(fontsize=7)
        fig.tight_layout()
        written.append(out / "spectra.png")
        fig.savefig(written[-1], dpi=100)
        plt.close(fig)
    return written


def _representatives(items):
    """First, middle and last layer's first matrix, plus the largest matrix."""
    layered = [(k, s) for k, s in items if s["layer"] is not None]
    if not layered:
        return items[:3]
    layers = sorted({s["layer"] for _, s in layered})
    picks = []
    for layer in dict.fromkeys([layers[0], layers[len(layers) // 2], layers[-1]]):
        picks.append(next((k, s) for k, s in layered if s["layer"] == layer))
    biggest = max(layered, key=lambda ks: ks[1]["shape"][0] * ks[1]["shape"][1])
    if biggest not in picks:
        picks.append(biggest)
    return picks
