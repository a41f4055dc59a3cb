"""The papers' own protocols, as pure functions: which slides a dataset has, how gene names are
harmonised, how targets are smoothed (REPRODUCE.md says which paper uses which; each function is
tested against a reference written in its test); and the papers' published numbers beside a run's
(its command below). The papers' fold assignments are in data.py's folds section, beside the
default one.

    python protocols.py runs/<name> [runs/<other> ...] --paper hist:brain
        # eval.py's table, then the paper's
"""
from __future__ import annotations

import threads  # noqa: F401  first: the thread defaults, set before torch loads (threads.py)
import argparse
import collections
import re
import sys
from pathlib import Path

import numpy as np
import torch

import eval as evaluation
from files import CacheError, listed, read_predictions, read_text

PROTOCOLS = Path(__file__).with_name("configs") / "protocols"
PAPERS = PROTOCOLS / "papers.yaml"


def expand_slide_ranges(items: list, where="") -> list[str]:
    """Slide ids from ids and inclusive ranges as papers print them: ["NCBI628-NCBI641",
    "NCBI599"]."""
    out = []
    for item in items:
        a, sep, b = str(item).partition("-")
        if not sep:
            out.append(a)
            continue
        pa, pb = a.rstrip("0123456789"), b.rstrip("0123456789")
        if pa != pb or not a[len(pa):] or not b[len(pb):] or int(a[len(pa):]) > int(b[len(pb):]):
            raise CacheError(f"{where}: expected an id range like NCBI628-NCBI641, found {item!r}")
        out += [f"{pa}{i}" for i in range(int(a[len(pa):]), int(b[len(pb):]) + 1)]
    return out


def read_slide_lists(path) -> dict[str, list[str]]:
    """A paper's datasets and their slide ids (configs/protocols/<paper>_slides.yaml): {key: [ids]}.
    Each entry's expanded ranges must give its printed count `n`, and no slide may be in two
    datasets."""
    import yaml  # only for this file format; the cache format needs no yaml
    table = yaml.safe_load(read_text(path))
    lists, owner = {}, {}
    for key, entry in table.items():
        ids = expand_slide_ranges(entry["slides"], f"{path}: {key}")
        if "n" in entry and len(ids) != int(entry["n"]):
            raise CacheError(f"{path}: {key}: expected {entry['n']} slides as printed, found "
                             f"{len(ids)} in {entry['slides']}")
        twice = sorted({s for s in ids if s in owner}
                       | {s for s, k in collections.Counter(ids).items() if k > 1})
        if twice:
            raise CacheError(f"{path}: slides listed in two datasets ({key} and "
                             f"{owner.get(twice[0], key)}): {listed(twice, 10)}")
        owner.update({s: key for s in ids})
        lists[key] = ids
    return lists


def dataset_slides(spec: str) -> tuple[Path, list[str]]:
    """'hist:brain' -> (configs/protocols/hist_slides.yaml, the ids of its dataset 'brain')."""
    paper, _, key = spec.partition(":")
    path = PROTOCOLS / f"{paper}_slides.yaml"
    if not path.exists():
        have = sorted(p.name.removesuffix("_slides.yaml") for p in PROTOCOLS.glob("*_slides.yaml"))
        raise CacheError(f"--dataset {spec}: expected <paper>:<dataset> with paper one of {have}, "
                         f"found no {path}")
    lists = read_slide_lists(path)
    if key not in lists:
        raise CacheError(f"{path}: expected a dataset {key!r}; it has {sorted(lists)}")
    return path, lists[key]


def harmonise_gene_names(genes) -> list[str]:
    """HiST A.1 (its preprocessing code): drop an assembly or species prefix (GRCh38_, GRCm39-,
    human_, mm10_, ...), drop everything from the first '.' (Ensembl version suffixes, and also the
    '.1' of clone-based names such as AC012345.1), upper-case. Duplicates that result are summed by
    the caller."""
    prefix = re.compile(r"^(GRCh38|GRCm39|human|mouse|HG38|MM10|GRCh37)[_|-]+", flags=re.IGNORECASE)
    return [prefix.sub("", str(g)).split(".")[0].upper() for g in genes]


# data.smooth of a config: SPCS with the parameters of MERGE's smoothing notebook; rescale: MERGE's
# 'spcs_to_8n' targets, each gene min-max scaled onto the slide's range of 8-neighbour means of
# log10 expression (eight_neighbour_mean, minmax_to_range; train.slide_targets).
SMOOTH = {"method": "spcs", "alpha": 0.6, "beta": 0.4, "tau_p": 16, "tau_s": 2, "pcs": 10,
          "hexagonal": False, "rescale": False}


def array_neighbours(grid):
    """(N, 2) integer array positions -> (neighbour, n_sites): neighbour(di, dj) is the (N,) row of
    the spot at each spot's position + (di, dj), -1 where there is none; n_sites is the number of
    distinct positions (N when they are unique; a repeated position holds its last spot). One lookup
    table over the bounding box, never N x N."""
    g = np.asarray(grid, dtype=np.int64)
    g = g - g.min(0)
    table = np.full(g.max(0) + 1, -1, dtype=np.int64)
    table[g[:, 0], g[:, 1]] = np.arange(len(g))

    def neighbour(di: int, dj: int) -> np.ndarray:
        i, j = g[:, 0] + di, g[:, 1] + dj
        ok = (i >= 0) & (j >= 0) & (i < table.shape[0]) & (j < table.shape[1])
        nb = np.full(len(g), -1)
        nb[ok] = table[i[ok], j[ok]]
        return nb
    return neighbour, int((table >= 0).sum())


def spcs(expr, grid, alpha: float = 0.6, beta: float = 0.4, tau_p: int = 16, tau_s: int = 2,
         n_pcs: int = 10, hexagonal: bool = False, chunk: int = 2048) -> np.ndarray:
    """SPCS label smoothing (Liu et al., Brief. Bioinform. 2022), as MERGE and FEAST apply it to
    targets. expr (N, G) log expression of one slide, grid (N, 2) integer array positions of its
    spots.

        E' = (1 - alpha) E + alpha (beta S + (1 - beta) P)
    S: spatial neighbours, 0 < |di| + |dj| <= tau_s (2 tau_s on a hexagonal array), weights
       1/distance;
    P: pattern neighbours, the tau_p spots with the largest exp(-4.5 d^2), d = 1 - Pearson
       correlation of the spots' first n_pcs principal-component scores (centred, unscaled), kept
       where d <= 1;
    each neighbour weight divided by (its spot's weight sum + 1e-8); a spot without neighbours gets
    0. Component signs follow the largest-|score| entry of each component (R's randomised PCA leaves
    them arbitrary). Pattern neighbours are found `chunk` rows at a time (never N x N at once)."""
    x = np.asarray(expr, dtype=np.float64)
    n = len(x)
    # pattern neighbours
    u, s, _ = (t.numpy() for t in torch.linalg.svd(torch.from_numpy(x - x.mean(0)),
                                                   full_matrices=False))
    k = min(n_pcs, len(s))
    scores = u[:, :k] * s[:k]                                              # (N, k)
    scores *= np.sign(scores[np.abs(scores).argmax(0), np.arange(k)])     # sign convention
    z = scores - scores.mean(1, keepdims=True)
    norm = np.linalg.norm(z, axis=1, keepdims=True)
    z = np.where(norm > 0, z / np.where(norm > 0, norm, 1), 0.0)  # constant rows: no neighbours
    pattern = np.zeros_like(x)
    keep = min(tau_p, n) if tau_p > 0 else n
    for a in range(0, n, chunk):
        b = min(n, a + chunk)
        d = 1.0 - z[a:b] @ z.T                                             # (B, N) Pearson distance
        r = np.where((d <= 1.0) & (norm[a:b] > 0) & (norm.T > 0), np.exp(-4.5 * d * d), 0.0)
        r[np.arange(b - a), np.arange(a, b)] = 0.0
        top = np.argsort(-r, axis=1, kind="stable")[:, :keep]  # ties: lower index first
        w = np.take_along_axis(r, top, 1)
        w /= w.sum(1, keepdims=True) + 1e-8
        pattern[a:b] = np.einsum("bk,bkg->bg", w, x[top])
    # spatial neighbours on the integer array
    neighbour, n_sites = array_neighbours(grid)
    if n_sites != n:
        raise ValueError(f"spcs: expected unique grid positions, found {n - n_sites} repeated")
    t = 2 * tau_s if hexagonal else tau_s
    spatial, wsum = np.zeros_like(x), np.zeros(n)
    for di in range(-t, t + 1):
        for dj in range(-t, t + 1):
            dist = abs(di) + abs(dj)
            if not 0 < dist <= t:
                continue
            nb = neighbour(di, dj)
            has = nb >= 0
            spatial[has] += x[nb[has]] / dist
            wsum[has] += 1.0 / dist
    spatial /= wsum[:, None] + 1e-8
    return (1 - alpha) * x + alpha * (beta * spatial + (1 - beta) * pattern)


def eight_neighbour_mean(expr, grid) -> np.ndarray:
    """Each spot's mean over itself and its (up to) 8 array neighbours, |di|, |dj| <= 1 (MERGE's
    '8n')."""
    x = np.asarray(expr, dtype=np.float64)
    neighbour, _ = array_neighbours(grid)
    total, count = np.zeros_like(x), np.zeros(len(x))
    for di in (-1, 0, 1):
        for dj in (-1, 0, 1):
            nb = neighbour(di, dj)
            total[nb >= 0] += x[nb[nb >= 0]]
            count[nb >= 0] += 1
    return total / count[:, None]


def minmax_to_range(x, lo: float, hi: float) -> np.ndarray:
    """Each column min-max scaled onto [lo, hi] (scikit-learn's
    MinMaxScaler(feature_range=(lo, hi)); a constant column becomes lo). MERGE's 'spcs_to_8n'
    targets: SPCS output onto the 8n range."""
    x = np.asarray(x, dtype=np.float64)
    span = x.max(0) - x.min(0)
    return (x - x.min(0)) / np.where(span > 0, span, 1.0) * (hi - lo) + lo


# ---- a paper's numbers beside a run's ------------------------------------------------------------
def paper_entry(key: str) -> dict:
    """configs/protocols/papers.yaml's entry `key`; an unknown key is an error listing the
    entries."""
    import yaml
    table = yaml.safe_load(read_text(PAPERS))
    if key not in table:
        raise ValueError(f"{PAPERS}: expected an entry --paper {key!r}; it has {', '.join(table)}")
    return table[key]


def paper_table(results: dict, run_dir, key: str) -> str:
    """The rows of configs/protocols/papers.yaml entry `key` and, below them, this run's values of
    the same metrics (mean ± std over folds); pcc_spot is computed from the run's prediction
    files."""
    entry, cells = paper_entry(key), []
    for m in entry["metrics"]:
        if m == "pcc_spot":
            folds = [[read_predictions(f)
                      for f in sorted((Path(run_dir) / name / "pred").glob("*.h5"))]
                     for name in results["fold_names"]]
            v = [evaluation.pcc_spot([f["pred"] for f in fs if f["true"] is not None],
                                     [f["true"] for f in fs if f["true"] is not None])
                 for fs in folds]
            cells.append(f"{evaluation.number(np.mean(v))} ± {evaluation.number(np.std(v))}")
        else:
            cells.append(evaluation.mean_std(results["metrics"][m]))
    lines = [f"{entry['source']} ({key}), beside {results['run']} ({results['n_folds']} folds):",
             "", "| method | " + " | ".join(entry["metrics"]) + " |",
             "| --- |" + " --- |" * len(entry["metrics"])]
    lines += [f"| {name} (paper) | " + " | ".join(str(v) for v in row) + " |"
              for name, row in entry["rows"].items()]
    lines.append(f"| {results['run']} (this run) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="protocols.py",
                                description="Re-evaluate runs as eval.py does, print its "
                                "table, then a paper's published numbers beside each run's.")
    p.add_argument("runs", nargs="+", help="run folders, e.g. runs/hist-brain")
    p.add_argument("--paper", required=True,
                   help="an entry of configs/protocols/papers.yaml, e.g. hist:brain")
    p.add_argument("--partial", action="store_true",
                   help="as eval.py: also runs with unfinished folds or missing slides")
    a = p.parse_args(argv)
    try:
        paper_entry(a.paper)                  # before evaluate_run rewrites each run's results.json
        results = [evaluation.evaluate_run(d, a.partial, a.partial) for d in a.runs]
        papers = [paper_table(r, d, a.paper) for r, d in zip(results, a.runs)]
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        sys.exit(f"protocols.py: {e}")
    evaluation.report(results)
    for table in papers:
        print("\n" + table)


if __name__ == "__main__":
    main()
