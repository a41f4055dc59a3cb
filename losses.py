"""The training objectives: what train.py minimises, one function per loss, each naming its paper.

    mse, pcc, mse_pcc   MSE in log space (HiST, FEAST), 1 - per-gene Pearson within a slide (STF's
                        PCC loss)
    zinb                negative log-likelihood of the raw counts under a ZINB (STF)
    gaussian            beta-NLL of the log1p target under N(pred, exp(log_var)) (model.head_var;
                        Seitzer 2022)
    pathway             1 - PCC between pathway scores and pathway activity of the targets (STF,
                        auxiliary)
    levels              a coarser level against its summed counts, a sub level summed into the spot
                        (HiFusion), MagNet's cross-scale consistency, HiFusion's feature alignment

compute_loss combines them as the config's train section says (train.loss, train.pcc_alpha,
train.nll_beta, train.pathway_lambda, train.level_weights, train.consistency_lambda,
train.align_lambda).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


# ---- the spot level ------------------------------------------------------------------------------
def pearson_per_column(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Pearson correlation of each column of a and b over the rows (spots): (N, G) -> (G,)."""
    a = a - a.mean(0)
    b = b - b.mean(0)
    # clamp before the square root: a constant column (a gene no pathway reaches, a gene absent from
    # the slide) gets PCC 0 and a finite gradient, where sqrt(0) would give inf * 0 = NaN
    return (a * b).sum(0) / (a.pow(2).sum(0) * b.pow(2).sum(0)).clamp_min(eps * eps).sqrt()


def pcc_loss(pred, target):
    """1 - mean per-gene Pearson within a slide (STF)."""
    return 1 - pearson_per_column(pred, target).mean()


def zinb_nll(x, mu, theta, pi_logit, eps=1e-8):
    """Mean negative log-likelihood of counts x under ZINB(mu, theta, pi), pi = sigmoid(pi_logit).

    NB(x) = G(x+theta) / (G(theta) x!) (theta/(theta+mu))^theta (mu/(theta+mu))^x;
    ZINB(0) = pi + (1-pi) NB(0), ZINB(x>0) = (1-pi) NB(x)."""
    log_theta_mu = torch.log(theta + mu + eps)
    nb = (torch.lgamma(x + theta) - torch.lgamma(theta) - torch.lgamma(x + 1)
          + theta * (torch.log(theta + eps) - log_theta_mu)
          + x * (torch.log(mu + eps) - log_theta_mu))
    log_pi, log_not_pi = -F.softplus(-pi_logit), -F.softplus(pi_logit)
    nb_zero = theta * (torch.log(theta + eps) - log_theta_mu)
    zero = torch.logaddexp(log_pi, log_not_pi + nb_zero)
    return -torch.where(x < 0.5, zero, log_not_pi + nb).mean()


def gaussian_nll(y, mu, log_var):
    """Elementwise negative log-likelihood of y under N(mu, exp(log_var)):
    0.5 (log 2 pi + log_var + (y - mu)^2 / exp(log_var))."""
    return 0.5 * (math.log(2 * math.pi) + log_var + (y - mu) ** 2 * torch.exp(-log_var))


def beta_nll(y, mu, log_var, beta: float = 0.5):
    """beta-NLL (Seitzer et al. 2022, eq. 4): the Gaussian NLL of each value weighted by sigma^(2
    beta), the weight held constant in the gradient. beta = 0 is the plain NLL, whose gradient on
    the mean is scaled by 1 / sigma^2: spots the model calls noisy stop teaching the mean, which
    then fits worse; beta = 1 gives the mean the gradient of the MSE. 0.5 is the paper's recommended
    compromise."""
    nll = gaussian_nll(y, mu, log_var)
    return (nll * torch.exp(beta * log_var.detach())).mean() if beta else nll.mean()


LOG_VAR_LIMIT = 12.0


def log_variance(raw):
    """The variance head's output (model.head_var; Tessera._head writes this bound inline)
    soft-bounded to (-12, 12): log sigma^2 of the log1p target per spot and gene (a Gaussian
    predictive distribution, Nix & Weigend 1994); exp never overflows and no spot's weight in the
    NLL explodes."""
    return LOG_VAR_LIMIT * torch.tanh(raw / LOG_VAR_LIMIT)


@torch.no_grad()
def start_variance(head: torch.nn.Linear, variance: torch.Tensor) -> None:
    """Make the variance head predict each gene's training variance (G,) at every spot: the model
    starts at the constant-width Gaussian around the training mean and learns where spots deviate
    from it."""
    head.weight.zero_()
    head.bias.copy_(LOG_VAR_LIMIT * torch.atanh(variance.clamp_min(1e-4).log() / LOG_VAR_LIMIT))


def pathway_loss(scores, target, membership):
    """STF auxiliary loss: 1 - PCC(scores, target pathway activity) with target = genes z-scored
    over the slide's spots, averaged over each pathway's member genes. Pathways with no member gene
    are skipped."""
    centred = target - target.mean(0)
    z = centred / (centred.square().mean(0).sqrt() + 1e-6)  # std(0, unbiased=False), faster
    size = membership.sum(1)
    keep = size > 0
    if not keep.any():
        return scores.sum() * 0
    act = z @ membership[keep].T / size[keep]                   # (N, P')
    return 1 - pearson_per_column(scores[:, keep], act).mean()


# ---- losses across the levels of the pyramid (HiFusion, MagNet) ----------------------------------
# A level k is an offset from the spot level: k < 0 below the spot (sub-spots), k > 0 above (bins of
# 2^k x 2^k lattice sites). `parents[k]` (N_k,) maps the rows of level k to the rows of level k + 1.
def to_level(parents: dict, a: int, b: int) -> torch.Tensor:
    """(N_a,) row at level b >= a of each row of level a: the parent maps composed; None for
    a = b."""
    index = None
    for k in range(a, b):
        index = parents[k] if index is None else parents[k][index]
    return index


def aggregate_log(pred, index, n_rows):
    """Log-space children (n, G) -> log-space parents (n_rows, G): log1p(sum over children of
    expm1(pred)), the children summed in count space. expm1 is clipped at 0: a negative log
    prediction counts as no counts (sum of counts >= 0, so the log1p is defined)."""
    counts = torch.expm1(pred.float()).clamp_min(0)
    return torch.log1p(counts.new_zeros(n_rows, pred.shape[1]).index_add_(0, index, counts))


def aggregation_loss(pred_sub, index, target):
    """A sub level has no truth: its children, aggregated in count space, must give the spot
    (HiFusion's per-scale supervision): MSE(log1p(sum_s expm1(pred_sub)), target). index (n,) = spot
    row."""
    return F.mse_loss(aggregate_log(pred_sub, index, target.shape[0]), target)


def consistency_loss(pred_parent, pred_child, index):
    """MagNet's cross-scale consistency: every predicted parent against its predicted children
    summed in count space, MSE in log space. index (n_child,) = the child's parent row."""
    return F.mse_loss(pred_parent.float(), aggregate_log(pred_child, index, pred_parent.shape[0]))


def alignment_loss(pooled, own):
    """HiFusion's cross-scale alignment: 1 - cosine similarity between the spot's pooled sub-tokens
    and the spot's own embedding, mean over spots."""
    return (1 - F.cosine_similarity(pooled.float(), own.float(), dim=-1)).mean()


def level_target(counts, parents: dict, k: int, n_rows: int) -> torch.Tensor:
    """Truth at a coarser level k > 0: log1p of the counts summed over each bin's spots."""
    index = to_level(parents, 0, k)
    return torch.log1p(counts.new_zeros(n_rows, counts.shape[1]).index_add_(0, index, counts))


def compute_loss(out, batch, cfg, model):
    """The loss of one slide: `out` the model's outputs, `batch` its tensors (target, counts,
    library_size), `cfg` the run's config, `model` for its pathway membership."""
    tc = cfg["train"]
    pred, y = out["pred"].float(), batch["target"]
    kind = tc["loss"]
    if kind == "mse":
        loss = F.mse_loss(pred, y)
    elif kind == "pcc":
        loss = pcc_loss(pred, y)
    elif kind == "mse_pcc":
        loss = F.mse_loss(pred, y) + tc["pcc_alpha"] * pcc_loss(pred, y)
    elif kind == "gaussian":
        loss = beta_nll(y, pred, out["log_var"].float(), tc["nll_beta"])
    else:  # zinb (checks.RANGES: no other value reaches here)
        log_rate, log_theta, pi_logit = out["zinb"].float().chunk(3, dim=-1)
        mu = log_rate.exp() * batch["library_size"][:, None] / 1e4      # library size as offset
        loss = zinb_nll(batch["counts"], mu, log_theta.exp(), pi_logit)
    if tc["pathway_lambda"] and "pathway_scores" in out:
        loss = loss + tc["pathway_lambda"] * pathway_loss(out["pathway_scores"].float(), y,
                                                          model.pathway_membership)
    if "levels" in out:
        loss = level_loss(loss, out, batch, cfg)
    return loss


def level_loss(loss0, out, batch, cfg):
    """The spot-level loss plus every other level's (weighted by train.level_weights): a coarser
    level against log1p of its summed counts, a sub level through its children summed into the spot
    (`aggregation_loss`); MagNet's consistency between consecutive predicted levels; HiFusion's
    alignment."""
    tc, levels, parents = cfg["train"], cfg["model"]["out_levels"], out["parents"]
    weight = dict(zip(levels, tc["level_weights"] or [1.0] * len(levels)))
    loss = weight[0] * loss0
    for k, pred in out["levels"].items():
        if k < 0:
            term = aggregation_loss(pred, to_level(parents, k, 0), batch["target"])
        else:
            term = F.mse_loss(pred.float(),
                              level_target(batch["counts"], parents, k, pred.shape[0]))
        loss = loss + weight[k] * term
    if tc["consistency_lambda"]:
        preds = {0: out["pred"], **out["levels"]}
        ks = sorted(preds)
        for a, b in zip(ks, ks[1:]):
            loss = loss + tc["consistency_lambda"] * consistency_loss(preds[b], preds[a],
                                                                      to_level(parents, a, b))
    if tc["align_lambda"] and "align" in out:
        loss = loss + tc["align_lambda"] * alignment_loss(*out["align"])
    return loss
