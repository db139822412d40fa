"""The report's two figures, one colour per model in both (`MODEL_COLORS`).

    plot_training_curves(run_dir, path)              # validation PRAUC and loss per epoch
    plot_metrics_by_group(models, path, groups)      # Jaccard and PRAUC per model and group
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from leader_edge.files import atomic_file

# Fixed per model so a reader can match bars to curves across figures and runs.
MODEL_COLORS = {"frequency": "#7f7f7f", "student-nodistill": "#1f77b4", "student": "#d62728", "teacher": "#2ca02c"}


def _history(path: Path) -> list:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return []


def plot_training_curves(run_dir: Path, path: Path) -> bool:
    """Validation PRAUC and training loss per epoch of every model and seed with a history; False if none."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = []  # (model, label, epochs, prauc, loss)
    for name in ("student-nodistill", "student"):
        for d in [run_dir / name, *sorted(run_dir.glob(f"{name}.seed-*"))]:
            hist = _history(d / "history.json")
            if hist:
                curves.append((name, d.name, [h["epoch"] for h in hist], [h["val_prauc"] for h in hist],
                               [h.get("train_loss", np.nan) for h in hist]))  # epoch 0 (the prior alone) has no loss
    teacher = (_history(run_dir / "teacher" / "metrics.json") or {})
    teacher = teacher.get("history", []) if isinstance(teacher, dict) else []
    if teacher:
        curves.append(("teacher", "teacher", [h["epoch"] for h in teacher], [h.get("val_prauc") for h in teacher],
                       [h.get("loss") for h in teacher]))
    if not curves:
        return False
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    labelled = set()
    for name, label, epochs, prauc, loss in curves:
        kw = {"color": MODEL_COLORS[name], "marker": ".", "alpha": 0.9 if name not in labelled else 0.45,
              "label": name if name not in labelled else None}
        labelled.add(name)
        ax1.plot(epochs, prauc, **kw)
        ax2.plot(epochs, loss, **{**kw, "label": None})
    ax1.set(title="validation PRAUC (one line per seed)", xlabel="epoch")
    ax2.set(title="training loss (student: BCE + distillation terms)", xlabel="epoch", yscale="log")
    ax1.legend()
    fig.tight_layout()
    save_figure(fig, path)
    return True


def plot_metrics_by_group(models: dict[str, dict], path: Path, groups: tuple[str, ...]) -> None:
    """Grouped bars: Jaccard and PRAUC per model and group; error bars = std across seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4), sharey=True)
    width = 0.8 / max(len(models), 1)
    x = np.arange(len(groups))
    for ax, metric in zip(axes, ("jaccard", "prauc")):
        for i, (name, m) in enumerate(models.items()):
            mean = [m["groups"][g][metric]["mean"] or 0.0 for g in groups]
            std = [m["groups"][g][metric]["std"] or 0.0 for g in groups]
            ax.bar(x + i * width - 0.4 + width / 2, mean, width, yerr=std, label=f"{name} ({len(m['seeds'])} seed(s))",
                   color=MODEL_COLORS.get(name), capsize=2)
        ax.set(title=metric, xticks=x, xticklabels=[g.replace("_", "-") for g in groups], ylim=(0, 1))
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def save_figure(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    try:
        with atomic_file(path) as tmp:
            fig.savefig(tmp, dpi=110)
    finally:
        plt.close(fig)
