"""The baselines tessera is compared with, behind the model's forward signature (features, coords, ...):

    linear, mlp     per spot, no spatial context (ST-Net-style probes), trained like tessera
    ridge           HEST-Benchmark: standardise, PCA, ridge without intercept, closed form
    ridge_spatial   ridge on [own features, mean features of the neighbours within given radii], closed form:
                    the cheapest use of context, and tessera's starting point with model.spatial_start
                    (SpatialStart: the ridge plus a network's residual; model.build_model builds it)
"""
from __future__ import annotations

import torch
import torch.nn as nn

import lattice
from attention import CHUNK


class PerSpot(nn.Module):
    """`linear`: Linear(C -> G). `mlp`: two hidden layers. No spatial context (ST-Net-style baselines)."""

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
                                     nn.Linear(h, h), nn.GELU(), nn.Dropout(cfg.dropout), nn.Linear(h, n_genes))

    def init_from_data(self, feat_mean, feat_std, target_mean, membership=None):
        self.feat_mean.copy_(feat_mean)
        self.feat_std.copy_(feat_std.clamp_min(1e-6))
        with torch.no_grad():
            self.net[-1].bias.copy_(target_mean)

    def forward(self, features, coords=None, pseudo_features=None, pseudo_coords=None, unit=None,
                return_attention=False, out_dtype=None):
        pred = self.net((features - self.feat_mean) / self.feat_std)
        return {"pred": pred.to(out_dtype) if out_dtype else pred}


class Ridge(nn.Module):
    """HEST-Benchmark's baseline: standardise, PCA to 256 components, ridge with alpha = 100 / (D * G),
    no intercept. Fitted in closed form by `fit`; no gradient training."""

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
                return_attention=False, out_dtype=None):
        with torch.autocast(features.device.type, enabled=False):  # weights solved in float64: no bf16 products
            z = (features.to(self.weight.dtype) - self.feat_mean) / self.feat_std - self.pca_mean
            pred = z @ self.components @ self.weight
        return {"pred": pred.to(out_dtype) if out_dtype else pred}


# ---- context without a network: neighbour means, the spatial ridge, tessera's linear start -------------
def radius_pairs(xy: torch.Tensor, radius: float, queries: torch.Tensor | None = None):
    """Every pair (i, j), i != j, of spots at most `radius` apart, i among `queries` (default: all spots),
    by a grid hash: cells of side `radius`, so the 3 x 3 cells around a spot hold all its neighbours.
    O(queries x neighbours) memory and time, never N x N."""
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


def neighbour_mean(x: torch.Tensor, xy: torch.Tensor, radius: float, start: int = 0, stop: int | None = None
                   ) -> torch.Tensor:
    """Rows start .. stop (default: all) of the (N, C) float32 mean of x over the other spots within
    `radius`; a spot with none keeps its own x. Query spots and their pairs go a chunk at a time: memory is
    a chunk's, never a slide's."""
    stop = len(xy) if stop is None else stop
    out = []
    for q0 in range(start, stop, CHUNK):
        queries = torch.arange(q0, min(q0 + CHUNK, stop), device=xy.device)
        i, j = radius_pairs(xy, radius, queries)
        own = x[queries].float()
        total = torch.zeros_like(own)
        for p in range(0, len(i), CHUNK):  # the pairs too: a chunk has ~30 times as many pairs as spots
            total.index_add_(0, i[p:p + CHUNK] - q0, x[j[p:p + CHUNK]].float())
        count = torch.bincount(i - q0, minlength=len(queries)).float()[:, None]
        out.append(torch.where(count > 0, total / count.clamp_min(1), own))
    return torch.cat(out) if len(out) != 1 else out[0]


def slide_statistics(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard deviation (C,) float32 of features (N, C) over the slide's own spots, accumulated
    in float64 one chunk of spots at a time; std at least 1e-6."""
    total = torch.zeros(x.shape[1], dtype=torch.float64, device=x.device)
    square = torch.zeros_like(total)
    for rows in x.split(CHUNK):
        total += rows.double().sum(0)
        square += rows.double().pow(2).sum(0)
    mean = total / len(x)
    std = (square / len(x) - mean * mean).clamp_min(0).sqrt().clamp_min(1e-6)
    return mean.float(), std.float()


class SpatialRidge(nn.Module):
    """`ridge_spatial`: ridge regression with intercept on [own features, mean features of the neighbours
    within each radius] (radii in spot pitches, the pitch = median nearest-neighbour distance of the slide).
    The cheapest use of context; fitted in closed form on the training slides by `fit_slides`."""

    def __init__(self, cfg, in_dim: int, n_genes: int):
        super().__init__()
        self.cfg = cfg
        D = in_dim * (1 + len(cfg.radii))
        self.register_buffer("feat_mean", torch.zeros(in_dim))
        self.register_buffer("feat_std", torch.ones(in_dim))
        self.register_buffer("design_mean", torch.zeros(D))
        self.register_buffer("weight", torch.zeros(D, n_genes))
        self.register_buffer("bias", torch.zeros(n_genes))

    def init_from_data(self, feat_mean, feat_std, target_mean, membership=None):
        if not self.cfg.slide_norm:
            self.feat_mean.copy_(feat_mean)
            self.feat_std.copy_(feat_std.clamp_min(1e-6))
        self.bias.copy_(target_mean)

    def designs(self, features, coords):
        """(N, C), (N, 2) -> (rows, (len(rows), C (1 + R)) design of those rows), a chunk of spots at a time:
        [z, mean of z within r_1 pitches, ...], z the standardised features (training statistics, or the
        slide's own with slide_norm). The map to z is affine, so the mean of z is z of the mean of the raw
        features: no standardised copy of the slide is made."""
        mean, std = slide_statistics(features) if self.cfg.slide_norm else (self.feat_mean, self.feat_std)
        z = lambda x: (x.float() - mean) / std  # noqa: E731
        N = len(features)
        pitch = lattice.median_nn_distance(coords) if N > 1 else 1.0
        for q0 in range(0, N, CHUNK):
            rows = slice(q0, min(q0 + CHUNK, N))
            yield rows, torch.cat([z(features[rows])] + [z(neighbour_mean(features, coords, r * pitch, rows.start,
                                                                        rows.stop)) for r in self.cfg.radii], 1)

    @torch.no_grad()
    def fit_slides(self, batches: list[dict]) -> None:
        """batches: one dict per training slide with `features`, `coords`, `target` (log space)."""
        x = torch.cat([d for b in batches for _, d in self.designs(b["features"], b["coords"])]).double()
        y = torch.cat([b["target"] for b in batches]).double()
        D, G = x.shape[1], y.shape[1]
        alpha = self.cfg.ridge_alpha if self.cfg.ridge_alpha is not None else 100.0 / (D * G)
        xm, ym = x.mean(0), y.mean(0)
        xc = x - xm
        w = torch.linalg.solve(xc.T @ xc + alpha * torch.eye(D, dtype=x.dtype, device=x.device), xc.T @ (y - ym))
        self.design_mean.copy_(xm)
        self.weight.copy_(w)
        self.bias.copy_(ym)

    def forward(self, features, coords, pseudo_features=None, pseudo_coords=None, unit=None,
                return_attention=False, out_dtype=None, into=None):
        """(design - design_mean) @ weight + bias, a chunk of spots at a time (`designs`): memory is the
        (N, G) output and a chunk's design. `into` (N, G): the prediction is added into it, in place."""
        with torch.autocast(features.device.type, enabled=False):  # weights solved in float64: no bf16 products
            bias = self.bias - self.design_mean @ self.weight
            pred = into if into is not None else torch.empty(len(features), len(bias), dtype=out_dtype or self.weight.dtype,
                                                            device=features.device)
            for rows, design in self.designs(features, coords):
                p = design.to(self.weight.dtype) @ self.weight + bias
                if into is not None:
                    pred[rows] += p.to(pred.dtype)
                else:
                    pred[rows] = p
        return {"pred": pred}


class SpatialStart(nn.Module):
    """tessera with `model.spatial_start` and / or `model.slide_norm`. spatial_start: the output is the
    closed-form spatial ridge (fitted first, then frozen) plus the network's prediction, whose head starts
    at zero, so training begins at the linear spatial solution and the network learns the residual.
    slide_norm: features (and pseudo-features) are standardised over each slide's spots first."""

    def __init__(self, cfg, net: nn.Module, in_dim: int, n_genes: int):
        super().__init__()
        self.cfg = cfg
        self.net = net                                     # the tessera network (model.build_model)
        self.start = SpatialRidge(cfg, in_dim, n_genes) if cfg.spatial_start else None

    def init_from_data(self, feat_mean, feat_std, target_mean, membership=None):
        if self.cfg.slide_norm:  # the network sees slide-standardised features
            feat_mean, feat_std = torch.zeros_like(feat_mean), torch.ones_like(feat_std)
        self.net.init_from_data(feat_mean, feat_std, target_mean, membership)
        if self.start is not None:
            self.start.init_from_data(feat_mean, feat_std, target_mean)
            with torch.no_grad():  # the residual starts at zero
                for p in self._last().parameters():
                    p.zero_()

    def _last(self) -> nn.Module:
        head = self.net.head
        return head.genes if self.cfg.head == "pathway" else head[-1] if self.cfg.head == "mlp" else head

    @torch.no_grad()
    def fit_slides(self, batches: list[dict]) -> None:
        if self.start is not None:
            self.start.fit_slides(batches)

    @property
    def pathway_membership(self):
        return self.net.pathway_membership

    @property
    def feat_mean(self):  # every model has one: its width is the feature width it expects
        return self.net.feat_mean

    def forward(self, features, coords, pseudo_features=None, pseudo_coords=None, unit=None,
                return_attention=False, out_dtype=None, **sub):
        """The network's output with the spatial ridge added to "pred". slide_norm hands the network the
        slide's own feature statistics (no standardised copy of the features); in inference the ridge is
        added into the network's prediction in place, so a large slide holds one (N, G) prediction."""
        stats = slide_statistics(features) if self.cfg.slide_norm else None
        out = self.net(features, coords, pseudo_features, pseudo_coords, unit=unit,
                       return_attention=return_attention, out_dtype=out_dtype, feat_stats=stats, **sub)
        if self.start is not None:  # the ridge reads the raw features and applies its own slide_norm
            if torch.is_grad_enabled():
                out["pred"] = out["pred"] + self.start(features, coords)["pred"].to(out["pred"].dtype)
            else:
                self.start(features, coords, into=out["pred"])
        return out
