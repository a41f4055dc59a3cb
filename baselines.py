"""The baselines tessera is compared with, behind the model's forward signature
(features, coords, ...):

    linear, mlp     per spot, no spatial context (ST-Net-style probes), trained like tessera
    ridge           HEST-Benchmark: standardise, PCA, ridge without intercept, closed form
    ridge_spatial   ridge on [own features, mean features of the neighbours within given radii],
                    closed form: the cheapest use of context, and tessera's starting point with
                    model.spatial_start (SpatialStart: the ridge plus a network's residual;
                    model.build_model builds it)
"""
from __future__ import annotations

import torch
import torch.nn as nn

import lattice
from kernels import CHUNK


class PerSpot(nn.Module):
    """`linear`: Linear(C -> G). `mlp`: two hidden layers. No spatial context (ST-Net-style
    baselines)."""

    def __init__(self, cfg, in_dim: int, n_genes: int):
        super().__init__()
        self.cfg = cfg
        self.register_buffer("feat_mean", torch.zeros(in_dim))
        self.register_buffer("feat_std", torch.ones(in_dim))
        if cfg.arch == "linear":
            self.net = nn.Sequential(nn.Linear(in_dim, n_genes))
        else:
            h = cfg.hidden
            self.net = nn.Sequential(nn.Linear(in_dim, h), nn.GELU(), nn.Dropout(cfg.dropout),
                                     nn.Linear(h, h), nn.GELU(), nn.Dropout(cfg.dropout),
                                     nn.Linear(h, n_genes))

    def init_from_data(self, feat_mean, feat_std, target_mean, membership=None):
        self.feat_mean.copy_(feat_mean)
        self.feat_std.copy_(feat_std.clamp_min(1e-6))
        with torch.no_grad():
            self.net[-1].bias.copy_(target_mean)

    def forward(self, features, coords=None, pseudo_features=None, pseudo_coords=None, unit=None,
                out_dtype=None):
        pred = self.net((features - self.feat_mean) / self.feat_std)
        return {"pred": pred.to(out_dtype) if out_dtype else pred}


class Ridge(nn.Module):
    """HEST-Benchmark's baseline: standardise, PCA to 256 components, ridge with
    alpha = 100 / (D * G), no intercept. Fitted in closed form by `fit`; no gradient training."""

    def __init__(self, cfg, in_dim: int, n_genes: int):
        super().__init__()
        self.cfg = cfg
        self.register_buffer("feat_mean", torch.zeros(in_dim))
        self.register_buffer("feat_std", torch.ones(in_dim))
        self.register_buffer("components", torch.zeros(in_dim, min(cfg.pca, in_dim)))
        self.register_buffer("pca_mean", torch.zeros(in_dim))
        self.register_buffer("weight", torch.zeros(min(cfg.pca, in_dim), n_genes))

    def init_from_data(self, feat_mean, feat_std, target_mean, membership=None):
        self.feat_mean.copy_(feat_mean)
        self.feat_std.copy_(feat_std.clamp_min(1e-6))

    @torch.no_grad()
    def fit(self, features: torch.Tensor, targets: torch.Tensor) -> None:
        """features (N, C) and targets (N, G) pooled over the training spots."""
        z = ((features - self.feat_mean) / self.feat_std).double()
        k = min(self.components.shape[1], *z.shape)
        _, _, vt = torch.linalg.svd(z - z.mean(0), full_matrices=False)
        comps = torch.zeros_like(self.components, dtype=torch.float64)
        comps[:, :k] = vt[:k].T
        self.components.copy_(comps)
        x = (z - z.mean(0)) @ comps                              # PCA scores, (N, D)
        D, G = x.shape[1], targets.shape[1]
        alpha = self.cfg.ridge_alpha if self.cfg.ridge_alpha is not None else 100.0 / (D * G)
        gram = x.T @ x + alpha * torch.eye(D, dtype=x.dtype, device=x.device)
        self.weight.copy_(torch.linalg.solve(gram, x.T @ targets.double()))
        self.pca_mean.copy_(z.mean(0))

    def forward(self, features, coords=None, pseudo_features=None, pseudo_coords=None, unit=None,
                out_dtype=None):
        # weights solved in float64: no bf16 products
        with torch.autocast(features.device.type, enabled=False):
            z = (features.to(self.weight.dtype) - self.feat_mean) / self.feat_std - self.pca_mean
            pred = z @ self.components @ self.weight
        return {"pred": pred.to(out_dtype) if out_dtype else pred}


# ---- context without a network: neighbour means, the spatial ridge, tessera's linear start -------
def radius_pairs(xy: torch.Tensor, radius: float, queries: torch.Tensor | None = None):
    """Every pair (i, j), i != j, of spots at most `radius` apart, i among `queries` (default: all
    spots), by a grid hash: cells of side `radius`, so the 3 x 3 cells around a spot hold all its
    neighbours. O(queries x neighbours) memory and time, never N x N."""
    p = xy.double()
    queries = torch.arange(len(p), device=p.device) if queries is None else queries
    cell = torch.floor((p - p.min(0).values) / radius).long() + 1     # >= 1: offsets -1 stay >= 0
    width = int(cell[:, 1].max()) + 2
    key = cell[:, 0] * width + cell[:, 1]
    order = torch.argsort(key)
    sorted_key = key[order]
    src, dst = [], []
    for dx in (-1, 0, 1):
        for dy in (-1, 0, 1):
            k = (cell[queries, 0] + dx) * width + cell[queries, 1] + dy
            lo = torch.searchsorted(sorted_key, k)
            count = torch.searchsorted(sorted_key, k, right=True) - lo
            i = torch.repeat_interleave(queries, count)
            first = torch.repeat_interleave(lo - (torch.cumsum(count, 0) - count), count)
            src.append(i)
            dst.append(order[first + torch.arange(len(i), device=p.device)])
    i, j = torch.cat(src), torch.cat(dst)
    keep = (i != j) & ((p[i] - p[j]).pow(2).sum(1) <= radius * radius * (1 + 1e-9))
    return i[keep], j[keep]


def neighbour_mean(x: torch.Tensor, xy: torch.Tensor, radius: float, start: int = 0,
                   stop: int | None = None
                   ) -> torch.Tensor:
    """Rows start .. stop (default: all) of the (N, C) float32 mean of x over the other spots within
    `radius`; a spot with none keeps its own x. Query spots and their pairs go a chunk at a time:
    memory is a chunk's, never a slide's."""
    stop = len(xy) if stop is None else stop
    out = []
    for q0 in range(start, stop, CHUNK):
        queries = torch.arange(q0, min(q0 + CHUNK, stop), device=xy.device)
        i, j = radius_pairs(xy, radius, queries)
        own = x[queries].float()
        total = torch.zeros_like(own)
        # the pairs too: a chunk has ~30 times as many pairs as spots
        for p in range(0, len(i), CHUNK):
            total.index_add_(0, i[p:p + CHUNK] - q0, x[j[p:p + CHUNK]].float())
        count = torch.bincount(i - q0, minlength=len(queries)).float()[:, None]
        out.append(torch.where(count > 0, total / count.clamp_min(1), own))
    return torch.cat(out) if len(out) != 1 else out[0]


def slide_statistics(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard deviation (C,) float32 of features (N, C) over the slide's own spots,
    accumulated in float64 one chunk of spots at a time; std at least 1e-6."""
    total = torch.zeros(x.shape[1], dtype=torch.float64, device=x.device)
    square = torch.zeros_like(total)
    for rows in x.split(CHUNK):
        total += rows.double().sum(0)
        square += rows.double().pow(2).sum(0)
    mean = total / len(x)
    std = (square / len(x) - mean * mean).clamp_min(0).sqrt().clamp_min(1e-6)
    return mean.float(), std.float()


# ---- the ridge's alpha (and per-slide standardisation) chosen on the training slides -------------
# model.ridge_cv: alpha / training spots, almost none to strong
ALPHAS = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)


def moments(x, y) -> tuple:
    """Sufficient statistics of a ridge with intercept: (n, sum x, x'x, x'y, sum y), float64."""
    return len(x), x.sum(0), x.T @ x, x.T @ y, y.sum(0)


def ridge_solutions(m: tuple, alphas):
    """For each alpha: (x mean, y mean, W) minimising |(x - x mean) W - (y - y mean)|^2 + alpha
    |W|^2, from moments; one eigendecomposition of the centred x'x serves every alpha."""
    n, sx, xx, xy, sy = m
    mx, my = sx / n, sy / n
    lam, v = torch.linalg.eigh(xx - n * torch.outer(mx, mx))
    vb = v.T @ (xy - n * torch.outer(mx, my))
    for a in alphas:
        yield mx, my, v @ (vb / (lam.clamp_min(0) + a)[:, None])


def pcc_gene(pred: torch.Tensor, true: torch.Tensor) -> float:
    """Mean over genes of the Pearson correlation over spots; a constant gene counts 0 (as
    eval.pcc_gene)."""
    p, t = pred - pred.mean(0), true - true.mean(0)
    den = (p.pow(2).sum(0) * t.pow(2).sum(0)).sqrt()
    return float(torch.where(den > 0, (p * t).sum(0) / den.clamp_min(1e-300),
                             torch.zeros_like(den)).mean())


def cv_groups(batches: list[dict]) -> list[str]:
    """What a validation fold holds out: a patient when the slides come from 3 or more patients
    (adjacent sections of one patient would leak), else a slide."""
    patients = [b["slide"].patient if "slide" in b else "" for b in batches]
    return patients if len(set(patients)) >= 3 else [str(i) for i in range(len(batches))]


def cv_scores(x: list, y: list, groups: list[str], alphas) -> list[float]:
    """Per alpha, the mean over groups of pcc_gene on the group's spots, fitted on the other
    groups."""
    per = [moments(a, b) for a, b in zip(x, y)]
    total = [sum(m[i] for m in per) for i in range(5)]
    scores = [[] for _ in alphas]
    for g in sorted(set(groups)):
        inside = [i for i, h in enumerate(groups) if h == g]
        rest = tuple(total[i] - sum(per[j][i] for j in inside) for i in range(5))
        xg, yg = torch.cat([x[j] for j in inside]), torch.cat([y[j] for j in inside])
        for k, (mx, my, w) in enumerate(ridge_solutions(rest, alphas)):
            scores[k].append(pcc_gene((xg - mx) @ w + my, yg))
    return [sum(s) / len(s) for s in scores]


class SpatialRidge(nn.Module):
    """`ridge_spatial`: ridge regression with intercept on [own features, mean features of the
    neighbours within each radius] (radii in spot pitches, the pitch = median nearest-neighbour
    distance of the slide). The cheapest use of context; fitted in closed form on the training
    slides by `fit_slides`."""

    def __init__(self, cfg, in_dim: int, n_genes: int):
        super().__init__()
        self.cfg = cfg
        D = in_dim * (1 + len(cfg.radii))
        self.register_buffer("feat_mean", torch.zeros(in_dim))
        self.register_buffer("feat_std", torch.ones(in_dim))
        self.register_buffer("design_mean", torch.zeros(D))
        self.register_buffer("weight", torch.zeros(D, n_genes))
        self.register_buffer("bias", torch.zeros(n_genes))
        # 1.0: per-slide standardisation was chosen on the training slides
        if cfg.slide_norm == "auto":
            self.register_buffer("slide_norm_on", torch.zeros(()))
        self.chosen, self.alpha = "", None                # what fit_slides chose, for the run's log

    def init_from_data(self, feat_mean, feat_std, target_mean, membership=None):
        if self.cfg.slide_norm is not True:
            self.feat_mean.copy_(feat_mean)
            self.feat_std.copy_(feat_std.clamp_min(1e-6))
        self.bias.copy_(target_mean)

    def norm_on(self) -> bool:
        """Whether features are standardised over each slide's own spots (slide_norm true, or auto
        and chosen)."""
        return (self.cfg.slide_norm is True
                or (self.cfg.slide_norm == "auto" and bool(self.slide_norm_on)))

    def designs(self, features, coords, norm: bool | None = None):
        """(N, C), (N, 2) -> (rows, (len(rows), C (1 + R)) design of those rows), a chunk of spots
        at a time: [z, mean of z within r_1 pitches, ...], z the standardised features (training
        statistics, or the slide's own with slide_norm; `norm` overrides). The map to z is affine,
        so the mean of z is z of the mean of the raw features: no standardised copy of the slide is
        made."""
        norm = self.norm_on() if norm is None else norm
        mean, std = slide_statistics(features) if norm else (self.feat_mean, self.feat_std)
        z = lambda x: (x.float() - mean) / std  # noqa: E731
        N = len(features)
        pitch = lattice.median_nn_distance(coords) if N > 1 else 1.0
        for q0 in range(0, N, CHUNK):
            rows = slice(q0, min(q0 + CHUNK, N))
            yield rows, torch.cat([z(features[rows])] + [
                z(neighbour_mean(features, coords, r * pitch, rows.start, rows.stop))
                for r in self.cfg.radii], 1)

    @torch.no_grad()
    def fit_slides(self, batches: list[dict]) -> None:
        """batches: one dict per training slide with `features`, `coords`, `target` (log space),
        `slide`. alpha: model.ridge_alpha, HEST-Benchmark's 100 / (D G) when null, or with
        model.ridge_cv the best of ALPHAS x spots by leave-one-group-out on these slides; slide_norm
        auto is chosen the same way."""
        norms = (False, True) if self.cfg.slide_norm == "auto" else (self.norm_on(),)
        y = [b["target"].double() for b in batches]
        x = {nm: [torch.cat([d for _, d in self.designs(b["features"], b["coords"], nm)]).double()
                  for b in batches]
             for nm in norms}
        D, G, N = x[norms[0]][0].shape[1], y[0].shape[1], sum(len(t) for t in y)
        alphas = [self.cfg.ridge_alpha if self.cfg.ridge_alpha is not None else 100.0 / (D * G)]
        if self.cfg.ridge_cv:
            alphas = [a * N for a in ALPHAS]
        xs, ys, groups = x, y, cv_groups(batches)
        # one slide: four bands of its spots along x stand in for slides
        if len(batches) == 1 and len(y[0]) >= 8:
            bands = torch.tensor_split(torch.argsort(batches[0]["coords"][:, 0]), 4)
            xs, ys, groups = ({nm: [v[0][b] for b in bands] for nm, v in x.items()},
                              [y[0][b] for b in bands], list("0123"))
        norm, k = norms[0], 0
        if len(norms) * len(alphas) > 1 and len(set(groups)) > 1:
            scores = {nm: cv_scores(xs[nm], ys, groups, alphas) for nm in norms}
            norm, k = max(((nm, k) for nm in norms for k in range(len(alphas))),
                          key=lambda t: scores[t[0]][t[1]])
            self.chosen = (f"alpha {alphas[k]:.3g}"
                           + (f", slide_norm {str(norm).lower()}" if len(norms) > 1 else "")
                           + f" (leave-one-out pcc_gene {scores[norm][k]:.4f} over "
                             f"{len(set(groups))} groups)")
        if self.cfg.slide_norm == "auto":
            self.slide_norm_on.fill_(float(norm))
        self.alpha = alphas[k]
        mx, my, w = next(ridge_solutions(moments(torch.cat(x[norm]), torch.cat(y)), [self.alpha]))
        self.design_mean.copy_(mx)
        self.weight.copy_(w)
        self.bias.copy_(my)

    def forward(self, features, coords, pseudo_features=None, pseudo_coords=None, unit=None,
                out_dtype=None, into=None):
        """(design - design_mean) @ weight + bias, a chunk of spots at a time (`designs`): memory is
        the (N, G) output and a chunk's design. `into` (N, G): the prediction is added into it, in
        place."""
        # weights solved in float64: no bf16 products
        with torch.autocast(features.device.type, enabled=False):
            bias = self.bias - self.design_mean @ self.weight
            pred = (into if into is not None
                    else torch.empty(len(features), len(bias), dtype=out_dtype or self.weight.dtype,
                                     device=features.device))
            for rows, design in self.designs(features, coords):
                p = design.to(self.weight.dtype) @ self.weight + bias
                if into is not None:
                    pred[rows] += p.to(pred.dtype)
                else:
                    pred[rows] = p
        return {"pred": pred}


# ---- a slide unlike every training slide: the closed form alone (model.ood_fallback) -------------
def novelty_radius(means: torch.Tensor, scale: torch.Tensor, groups: list[str]) -> float:
    """The largest distance from a training slide to its nearest slide of another group (patient, or
    slide): how far a new group's slide may lie from the training slides and still be like them.
    Distances are root-mean-square differences of slide-mean features over `scale`; 0 with a single
    group (nothing to compare with, so every new slide counts as unlike)."""
    z = means / scale
    d = torch.cdist(z, z) / z.shape[1] ** 0.5
    other = torch.tensor([[a != b for b in groups] for a in groups], device=d.device)
    nearest = torch.where(other, d, torch.full_like(d, float("inf"))).min(1).values
    return float(nearest[nearest.isfinite()].max()) if nearest.isfinite().any() else 0.0


class SpatialStart(nn.Module):
    """tessera with `model.spatial_start` and / or `model.slide_norm`. spatial_start: the output is
    the closed-form spatial ridge (fitted first, then frozen) plus the network's prediction, whose
    head starts at zero, so training begins at the linear spatial solution and the network learns
    the residual. slide_norm: features (and pseudo-features) are standardised over each slide's
    spots first. ood_fallback: in inference, a slide further from every training slide than the
    training groups are from each other (`novelty_radius`) gets the spatial ridge alone: the
    residual was learned on slides like the training slides, and on a new patient's unlike slide it
    adds the training patients' particulars."""

    def __init__(self, cfg, net: nn.Module, in_dim: int, n_genes: int):
        super().__init__()
        self.cfg = cfg
        self.net = net                                     # the tessera network (model.build_model)
        # the spatial ridge: the start, and with slide_norm auto also the judge of per-slide
        # standardisation
        self.start = (SpatialRidge(cfg, in_dim, n_genes)
                      if cfg.spatial_start or cfg.slide_norm == "auto" else None)
        # the training slides' mean features, their scale, and the radius of "like them"
        if cfg.ood_fallback:
            self.register_buffer("train_means", torch.zeros(0, in_dim))
            self.register_buffer("ood_scale", torch.ones(in_dim))
            self.register_buffer("ood_radius", torch.zeros(()))

    def init_from_data(self, feat_mean, feat_std, target_mean, membership=None):
        if self.start is not None:
            self.start.init_from_data(feat_mean, feat_std, target_mean)
        # the training spots' standard deviation: the unit of novelty's distances
        if self.cfg.ood_fallback:
            self.ood_scale.copy_(feat_std.clamp_min(1e-6))
        # the network sees slide-standardised features (auto: the stem is handed the slide's)
        if self.cfg.slide_norm is True:
            feat_mean, feat_std = torch.zeros_like(feat_mean), torch.ones_like(feat_std)
        self.net.init_from_data(feat_mean, feat_std, target_mean, membership)
        if self.cfg.spatial_start:
            with torch.no_grad():  # the residual starts at zero
                for p in self.net.head.start().parameters():
                    p.zero_()

    def norm_on(self) -> bool:
        return self.cfg.slide_norm is True or (self.start is not None and self.start.norm_on())

    @torch.no_grad()
    def fit_slides(self, batches: list[dict]) -> None:
        if self.start is not None:
            self.start.fit_slides(batches)
        if self.cfg.ood_fallback:
            self.train_means = torch.stack([slide_statistics(b["features"])[0] for b in batches])
            self.ood_radius.fill_(novelty_radius(self.train_means, self.ood_scale,
                                                 cv_groups(batches)))

    def _load_from_state_dict(self, state_dict, prefix, *args):
        if prefix + "train_means" in state_dict:  # its length is the number of training slides
            self.train_means = torch.empty_like(state_dict[prefix + "train_means"])
        super()._load_from_state_dict(state_dict, prefix, *args)

    def novelty(self, features) -> float:
        """The slide's distance to its nearest training slide (as `novelty_radius` measures
        them); 0 for a model not yet fitted to any slide (nothing to be unlike)."""
        if len(self.train_means) == 0:
            return 0.0
        z = ((slide_statistics(features)[0].to(self.train_means.device) - self.train_means)
             / self.ood_scale)
        return float(z.pow(2).mean(1).sqrt().min())

    def unlike_training(self, features) -> bool:
        """Whether this slide gets the spatial ridge alone in inference (model.ood_fallback)."""
        return bool(self.cfg.ood_fallback and self.novelty(features) > float(self.ood_radius))

    # what the spatial ridge chose on the training slides (alpha, slide_norm)
    @property
    def chosen(self) -> str:
        chosen = self.start.chosen if self.start is not None else ""
        if self.cfg.ood_fallback:
            chosen += (f"{'; ' if chosen else ''}slides unlike the training slides beyond "
                       f"{float(self.ood_radius):.3g}")
        return chosen

    @property
    def pathway_membership(self):
        return self.net.pathway_membership

    @property
    def feat_mean(self):  # every model has one: its width is the feature width it expects
        return self.net.feat_mean

    def forward(self, features, coords, pseudo_features=None, pseudo_coords=None, unit=None,
                out_dtype=None, **sub):
        """The network's output with the spatial ridge added to "pred". slide_norm hands the network
        the slide's own feature statistics (no standardised copy of the features); in inference the
        ridge is added into the network's prediction in place, so a large slide holds one (N, G)
        prediction."""
        if self.cfg.spatial_start and not (self.training or self.cfg.head_var) \
                and list(self.cfg.out_levels) == [0] and self.unlike_training(features):
            return self.start(features, coords, out_dtype=out_dtype)  # the network would be zeroed
        stats = slide_statistics(features) if self.norm_on() else None
        out = self.net(features, coords, pseudo_features, pseudo_coords, unit=unit,
                       out_dtype=out_dtype, feat_stats=stats, **sub)
        # the ridge reads the raw features and applies its own slide_norm
        if self.cfg.spatial_start:
            if not self.training and self.unlike_training(features):
                # unlike every training slide: the closed form alone
                out["pred"] = torch.zeros_like(out["pred"])
            if torch.is_grad_enabled():
                out["pred"] = (out["pred"]
                               + self.start(features, coords)["pred"].to(out["pred"].dtype))
            else:
                self.start(features, coords, into=out["pred"])
        return out
