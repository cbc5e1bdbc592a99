"""PNG plots of an analysis report (matplotlib, the optional `plots` extra, imported only here)."""
from __future__ import annotations

from pathlib import Path

LEAD_COLOR, OTHER_COLOR = "tab:green", "tab:red"


def require_matplotlib():
    """The matplotlib `Figure` class, or an ImportError that says how to get it."""
    try:
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError(
            "the analysis plots need matplotlib: pip install 'coconut-fast[plots]' (or pass --no-plots)"
        ) from e
    return Figure


def plot_node_heatmap(result: dict, path: str | Path) -> Path:
    """Heat map of one record: the probability of every node reachable from the root (rows, by
    distance) at every thought (columns); frontier cells are outlined, green when the node
    leads to the target, red when it does not."""
    Figure = require_matplotlib()
    from matplotlib.patches import Rectangle

    g = result["graph"]
    if g is None:
        raise ValueError(f"record {result['index']} has no graph analysis to plot")
    n = len(g["node_probs"])
    rows = sorted((d, v) for v, d in enumerate(g["distance"]) if d is not None and v != g["root"])
    nodes = [v for _, v in rows]
    values = [[g["node_probs"][i][v] for i in range(n)] for v in nodes]
    fig = Figure(figsize=(2.0 + 0.6 * max(n, 1), 1.2 + 0.28 * max(len(nodes), 1)), layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(values if nodes else [[0.0] * max(n, 1)], aspect="auto", cmap="viridis", vmin=0.0,
                      interpolation="nearest")
    fig.colorbar(image, ax=ax, label="probability of the node's first token")
    for i, f in enumerate(g["frontiers"]):
        for group, color in (("lead", LEAD_COLOR), ("other", OTHER_COLOR)):
            for v in f[group]:
                if v in nodes:
                    ax.add_patch(Rectangle((i - 0.45, nodes.index(v) - 0.45), 0.9, 0.9, fill=False,
                                           edgecolor=color, lw=2))
    ax.set_xticks(range(n))
    labels = [f"{g['symbols'][v]}{' (target)' if v == g['target'] else ''}  d={d}" for d, v in rows]
    ax.set_yticks(range(len(nodes)), labels, fontsize=7)
    for label, v in zip(ax.get_yticklabels(), nodes):
        label.set_color(LEAD_COLOR if g["leads_to_target"][v] else "black")
    ax.set_xlabel("thought i; outlined: nodes i+1 hops out\n(green: leads to the target, red: does not)", fontsize=8)
    ax.set_title(f"record {result['index']}: root {g['symbols'][g['root']]}", fontsize=9)
    return _save(fig, path)


def plot_value_curves(curves: dict, path: str | Path) -> Path:
    """Dataset value curves: mean frontier-node probability and mean frontier mass per thought."""
    Figure = require_matplotlib()
    x = curves["thought"]

    def line(key):
        return [float("nan") if v is None else v for v in curves[key]]

    fig = Figure(figsize=(9, 3.5), layout="constrained")
    left, right = fig.subplots(1, 2)
    for ax, kind, title in ((left, "value", "mean value of a frontier node"),
                            (right, "mass", "mean frontier probability mass")):
        ax.plot(x, line(f"lead_{kind}_mean"), "o-", color=LEAD_COLOR, label="leads to target")
        ax.plot(x, line(f"other_{kind}_mean"), "s--", color=OTHER_COLOR, label="does not lead to target")
        ax.set_xticks(x)
        ax.set_xlabel("thought i (frontier: nodes i+1 hops from the root)")
        ax.set_title(title, fontsize=10)
        ax.set_ylim(bottom=0)
    left.set_ylabel("probability")
    left.legend(fontsize=8)
    return _save(fig, path)


def write_plots(report: dict, out_dir: str | Path, max_heatmaps: int = 10) -> list[Path]:
    """The value curves and the heat maps of the first `max_heatmaps` records, under out_dir/plots/."""
    require_matplotlib()
    plots = Path(out_dir) / "plots"
    if report["value_curves"] is None:
        return []
    paths = [plot_value_curves(report["value_curves"], plots / "value_curves.png")]
    for result in report["records"][:max_heatmaps]:
        paths.append(plot_node_heatmap(result, plots / f"record_{result['index']:05d}_nodes.png"))
    return paths


def _save(fig, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path
