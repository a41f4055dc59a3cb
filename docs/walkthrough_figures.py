"""The pictures of docs/walkthrough.md, and the program that redraws them.

The walkthrough's code blocks call the drawing functions here (lattice, windows, coarsening), so
that the page shows the model's code and this file holds the matplotlib. Run as a program, it
runs the walkthrough's ```python blocks and the commands of its ```bash blocks in order, in one
namespace, in a temporary folder, and copies the pictures they draw (tour/*.png) into
docs/walkthrough/:

    python docs/walkthrough_figures.py            # redraw docs/walkthrough/*.png
    python docs/walkthrough_figures.py --out DIR  # elsewhere

tests/test_walkthrough.py runs the page the same way (`run_blocks`) and checks what its text says.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import os
import re
import shlex
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
PAGE = DOCS / "walkthrough.md"
DPI = 80


# ---------------------------------------------------------------- the page's blocks
def blocks(text: str) -> list[tuple[str, str]]:
    """The fenced blocks of a markdown page in order: (language, code), e.g. ("python", "...")."""
    return re.findall(r"^```(\w*)\n(.*?)^```", text, re.S | re.M)


def commands(code: str) -> list[str]:
    """The `python ...` commands of a ```bash block, a line ending in a backslash joined to the
    next."""
    lines = code.replace("\\\n", " ").splitlines()
    return [" ".join(line.split()) for line in lines if line.strip().startswith("python ")]


def run_command(command: str) -> None:
    """A `python X.py ARGS` command of the page, in this process: main(ARGS) of the checkout's X.py
    (what the shell would run, without starting Python and torch again)."""
    args = shlex.split(command)
    if len(args) < 2 or args[0] != "python" or not args[1].endswith(".py") or "/" in args[1]:
        raise ValueError(f"{command!r}: expected `python X.py ...` with X.py in the checkout")
    program = importlib.import_module(args[1][:-3])
    try:
        program.main(args[2:])
    except SystemExit as e:
        if e.code not in (None, 0):
            raise RuntimeError(f"{command}: {e.code}") from None


def run_blocks(folder, text: str | None = None) -> tuple[dict, list[str]]:
    """Run the page's ```python blocks and the commands of its ```bash blocks in order, the blocks
    in one namespace, with `folder` as the working directory (made if missing; `configs` there
    links to the checkout's) and the checkout importable. -> (the namespace, what each python or
    bash block printed, in order)."""
    text = PAGE.read_text() if text is None else text
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / "configs").exists():
        (folder / "configs").symlink_to(ROOT / "configs")
    for path in (str(DOCS), str(ROOT)):
        if path not in sys.path:
            sys.path.insert(0, path)
    namespace, printed, cwd = {"__name__": "__walkthrough__"}, [], os.getcwd()
    os.chdir(folder)
    try:
        for lang, code in blocks(text):
            if lang not in ("python", "bash"):
                continue
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                if lang == "python":
                    exec(compile(code, f"{PAGE.name}, block {len(printed) + 1}", "exec"), namespace)
                for command in commands(code) if lang == "bash" else []:
                    run_command(command)
            printed.append(out.getvalue())
    finally:
        os.chdir(cwd)
    return namespace, printed


# ---------------------------------------------------------------- drawing
def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ImportError("the walkthrough's pictures need matplotlib: pip install matplotlib") \
            from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    _pyplot().close(fig)
    return path


def _sites_axes(ax, sites, title):
    """An axes in lattice coordinates: i (from x) to the right, j (from y) downwards, as in the
    image of the slide; every site of the slide a light grey square."""
    s = np.asarray(sites)
    ax.scatter(s[:, 0], s[:, 1], s=14, marker="s", color="0.85", linewidths=0)
    ax.set_xlim(s[:, 0].min() - 1, s[:, 0].max() + 1)
    ax.set_ylim(s[:, 1].max() + 1, s[:, 1].min() - 1)
    ax.set_aspect("equal")
    ax.set_xlabel("i (from x)", fontsize=8)
    ax.set_ylabel("j (from y)", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.set_title(title, fontsize=9)


def lattice(xy, sites, path) -> Path:
    """The spots in micrometres and their lattice sites side by side, both coloured by the spot's
    row in row-major order (sorted by i, then j)."""
    plt = _pyplot()
    xy, s = np.asarray(xy), np.asarray(sites)
    n = np.arange(len(s))
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4.2), layout="constrained")
    a.scatter(xy[:, 0], xy[:, 1], c=n, cmap="viridis", s=22)
    a.set_ylim(xy[:, 1].max() + 60, xy[:, 1].min() - 60)
    a.set_aspect("equal")
    a.set_title(f"{len(xy)} spots, hexagonal, 100 µm apart", fontsize=9)
    a.set_xlabel("x (µm)", fontsize=8)
    a.set_ylabel("y (µm)", fontsize=8)
    a.tick_params(labelsize=7)
    _sites_axes(b, s, "their sites (i, j) on the integer lattice")
    im = b.scatter(s[:, 0], s[:, 1], c=n, cmap="viridis", s=14, marker="s")
    b.set_xticks(np.arange(0, s[:, 0].max() + 1, 5))
    b.grid(True, lw=0.3, color="0.8")
    fig.colorbar(im, ax=b, fraction=0.04, label="spot row (row-major order)")
    return _save(fig, path)


def _window_box(ax, corner, side, **style):
    import matplotlib.patches as patches
    ax.add_patch(patches.Rectangle((corner[0] - 0.5, corner[1] - 0.5), side, side, fill=False,
                                   **style))


def windows(sites, query, w, standard, shifted, region, path) -> Path:
    """One spot's standard window, its shifted window and the union eq. (2) attends over, on the
    whole lattice (left, the two partitions' grids drawn) and zoomed in (right). standard, shifted:
    sets of token rows; region: the 4w x 4w block of union_rulebook's keys, its corner site."""
    plt = _pyplot()
    s = np.asarray(sites)
    q = s[query]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.6), layout="constrained",
                             gridspec_kw={"width_ratios": [1.25, 1]})
    both = standard & shifted
    groups = [(standard - both, "tab:blue", f"standard window only ({len(standard - both)})"),
              (shifted - both, "tab:orange", f"shifted window only ({len(shifted - both)})"),
              (both, "tab:purple", f"both ({len(both)})")]
    for k, ax in enumerate(axes):
        titles = ["the two partitions of the lattice into 2w x 2w windows",
                  f"spot {query}: eq. (2) attends over {len(standard | shifted)} keys"]
        _sites_axes(ax, s, titles[k])
        if k == 0:
            for v in range(0, s.max() + 2 * w + 1, 2 * w):
                style = dict(color="tab:blue", lw=0.6, alpha=0.5)
                ax.axvline(v - 0.5, **style)
                ax.axhline(v - 0.5, **style)
                style = dict(color="tab:orange", lw=0.6, alpha=0.5, ls="--")
                ax.axvline(v - w - 0.5, **style)
                ax.axhline(v - w - 0.5, **style)
        for rows, colour, label in groups:
            p = s[sorted(rows)].reshape(-1, 2)
            ax.scatter(p[:, 0], p[:, 1], s=14 if k == 0 else 60, marker="s", color=colour,
                       label=label if k else None)
        std_corner = q // (2 * w) * (2 * w)
        shift_corner = (q + w) // (2 * w) * (2 * w) - w
        _window_box(ax, std_corner, 2 * w, color="tab:blue", lw=2)
        _window_box(ax, shift_corner, 2 * w, color="tab:orange", lw=2, ls="--")
        _window_box(ax, region, 4 * w, color="0.4", lw=1, ls=":")
        ax.plot(*q, marker="*", color="black", markersize=10 if k == 0 else 16)
    lo, hi = np.asarray(region) - 1, np.asarray(region) + 4 * w
    axes[1].set_xlim(lo[0], hi[0])
    axes[1].set_ylim(hi[1], lo[1])
    axes[1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0,
                   title="keys of the spot (star)", title_fontsize=7)
    return _save(fig, path)


def coarsening(sites, parent_sites, parent, slot, path, box) -> Path:
    """One coarsening step, zoomed into box = (i0, j0, side) of level l: left, the level-l sites
    coloured by their child slot, each parent's 2 x 2 block of sites outlined; right, the parents on
    the level-(l + 1) lattice with their number of children."""
    plt = _pyplot()
    s, ps = np.asarray(sites), np.asarray(parent_sites)
    parent, slot = np.asarray(parent), np.asarray(slot)
    children = np.bincount(parent, minlength=len(ps))
    i0, j0, side = box
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.6), layout="constrained")
    panels = ((s, slot, "tab10", 0, 9, "level l: the child slot 2 (i % 2) + (j % 2) of each site",
               1),
              (ps, children, "Purples", 0, 5, "level l + 1: the parents (i // 2, j // 2), "
               "their number of children", 2))
    for ax, (pts, value, cmap, vmin, vmax, title, scale) in zip(axes, panels):
        lo, n = np.array([i0, j0]) // scale, side // scale
        keep = ((pts >= lo) & (pts < lo + n)).all(1)
        ax.scatter(pts[keep, 0], pts[keep, 1], c=value[keep], cmap=cmap, vmin=vmin, vmax=vmax,
                   s=(210 / n) ** 2, marker="s")
        for (x, y), t in zip(pts[keep], value[keep]):
            ax.text(x, y, str(t), ha="center", va="center", fontsize=8)
        ax.set_xlim(lo[0] - 0.5, lo[0] + n - 0.5)
        ax.set_ylim(lo[1] + n - 0.5, lo[1] - 0.5)
        ax.set_aspect("equal")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("i", fontsize=8)
        ax.set_ylabel("j", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.set_xticks(np.arange(lo[0], lo[0] + n, 2 if scale == 1 else 1))
        ax.set_yticks(np.arange(lo[1], lo[1] + n, 2 if scale == 1 else 1))
    for u, v in ps[children > 0]:
        if i0 <= 2 * u < i0 + side and j0 <= 2 * v < j0 + side:
            _window_box(axes[0], (2 * u, 2 * v), 2, color="0.3", lw=1)
    return _save(fig, path)


# ---------------------------------------------------------------- redraw docs/walkthrough/
def redraw(out, text: str | None = None) -> list[str]:
    """Run the page (`run_blocks`) in a temporary folder and copy the pictures it draws into `out`;
    -> what its blocks printed."""
    with tempfile.TemporaryDirectory() as tmp:
        printed = run_blocks(tmp, text)[1]
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        for png in sorted((Path(tmp) / "tour").glob("*.png")):
            shutil.copy(png, out / png.name)
    return printed


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Redraw the walkthrough's pictures.")
    p.add_argument("--out", default=str(DOCS / "walkthrough"), help="folder of the PNGs")
    out = Path(p.parse_args(argv).out)
    redraw(out)
    for png in sorted(out.glob("*.png")):
        print(f"{png}: {png.stat().st_size // 1024} kB")


if __name__ == "__main__":
    main()
