"""Light neural baselines and auxiliary policies, and the Generator-Evaluator pipeline.

- `PointwiseDNN`: an MLP scoring each candidate alone from user, pooled history, item and
  category embeddings; BCE on the logged shown labels. Sorted it is a baseline, Plackett-Luce
  sampled an auxiliary policy.
- `PRM`: a list-wise re-scorer (Zhuang et al. style): a Transformer over all N candidates in
  the user's context, so an item's score depends on the other candidates; trained with BCE on
  the shown items' labels, each scored in the full-candidate context; sorted by its scores.
- `GeneratorEvaluator`: several generators propose lists, a reward model scores them, the
  best list per request wins: the serving pipeline GoalRank replaces.

`pointwise_loss` / `prm_loss` are per-batch losses (usable inside a Ray Train worker, where
`model` may be DDP-wrapped); `train_pointwise` / `train_prm` are the in-process loops.
"""
from __future__ import annotations

import time
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from goalrank_core.batch import PAD, EncodedRequests, RequestBatch
from goalrank_core.config_sections import PolicyConfig, TrainConfig
from goalrank_core.errors import GoalRankInputError
from goalrank_core.layers import in_table
from goalrank_core.policies import ListPolicy, ScorePolicy, propose_all

# ---------------------------------------------------------------- models


class _Features(nn.Module):
    """Embeddings of a request: user, mean-pooled history, candidate items and categories.
    Indices beyond a table (ids added after training) read the UNK row (category: 0)."""

    def __init__(self, n_users: int, n_items: int, n_categories: int, d: int):
        super().__init__()
        self.user = nn.Embedding(max(n_users, 2), d)
        self.item = nn.Embedding(max(n_items, 2), d, padding_idx=PAD)
        self.category = nn.Embedding(max(n_categories, 1), d)
        for emb in (self.user, self.item, self.category):
            nn.init.normal_(emb.weight, std=0.05)

    def forward(self, b: RequestBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> user (B, d), history mean (B, d), items (B, N, d), categories (B, N, d)."""
        n_item = self.item.num_embeddings
        user = self.user(in_table(b.user, self.user.num_embeddings))
        hist = self.item(in_table(b.history, n_item))  # (B, H, d), PAD rows are zero
        hmask = (b.history != PAD).to(hist.dtype)  # (B, H)
        hist_mean = hist.sum(1) / hmask.sum(1, keepdim=True).clamp(min=1)
        items = self.item(in_table(b.candidates, n_item))
        cats = self.category(in_table(b.category, self.category.num_embeddings, 0))
        return user, hist_mean, items, cats


class PointwiseDNN(nn.Module):
    """Scores each candidate independently: (B, N) logits of a click."""

    def __init__(self, n_users: int, n_items: int, n_categories: int, cfg: PolicyConfig | None = None):
        super().__init__()
        cfg = cfg or PolicyConfig()
        self.init_args = {"n_users": n_users, "n_items": n_items, "n_categories": n_categories}
        d, h = cfg.dnn_dim, cfg.dnn_hidden
        self.unshown_weight = cfg.unshown_weight  # read by pointwise_loss
        self.features = _Features(n_users, n_items, n_categories, d)
        self.mlp = nn.Sequential(nn.Linear(5 * d, h), nn.ReLU(), nn.Dropout(cfg.dropout),
                                 nn.Linear(h, h), nn.ReLU(), nn.Linear(h, 1))

    def forward(self, batch: RequestBatch) -> torch.Tensor:
        user, hist, items, cats = self.features(batch)
        ctx = (user + hist)[:, None, :].expand_as(items)  # (B, N, d)
        x = torch.cat([items, cats, ctx, hist[:, None, :].expand_as(items), items * ctx], dim=-1)  # (B, N, 5d)
        return self.mlp(x).squeeze(-1)  # (B, N)


class PRM(nn.Module):
    """List-wise re-scorer over all N candidates: (B, N) click logits, each in the context of
    the whole candidate set (self-attention) and of the user. A position embedding carries the
    first-stage order, as PRM's initial-list position does."""

    def __init__(self, n_users: int, n_items: int, n_categories: int, n_positions: int, cfg: PolicyConfig | None = None):
        super().__init__()
        cfg = cfg or PolicyConfig()
        self.init_args = {"n_users": n_users, "n_items": n_items, "n_categories": n_categories,
                          "n_positions": n_positions}
        d = cfg.prm_d_model
        self.unshown_weight = cfg.unshown_weight  # read by prm_loss
        self.features = _Features(n_users, n_items, n_categories, d)
        self.position = nn.Embedding(max(n_positions, 1), d)
        self.inp = nn.Sequential(nn.Linear(3 * d, d), nn.LayerNorm(d))
        layer = nn.TransformerEncoderLayer(d, cfg.prm_heads, dim_feedforward=2 * d, dropout=cfg.dropout,
                                           batch_first=True, norm_first=True, activation="gelu")
        # Nested tensors off: they would zero padded outputs and change results by padding layout.
        self.encoder = nn.TransformerEncoder(layer, cfg.prm_layers, enable_nested_tensor=False, norm=nn.LayerNorm(d))
        self.head = nn.Sequential(nn.Linear(2 * d, d), nn.GELU(), nn.Linear(d, 1))

    def forward(self, batch: RequestBatch) -> torch.Tensor:
        user, hist, items, cats = self.features(batch)
        n = items.shape[1]
        pos = torch.arange(n, device=items.device).clamp(max=self.position.num_embeddings - 1)
        tok = items + cats + self.position(pos)[None]  # (B, N, d)
        ctx = (user + hist)[:, None, :].expand_as(tok)
        x = self.inp(torch.cat([tok, ctx, tok * ctx], dim=-1))  # (B, N, d)
        h = self.encoder(x, src_key_padding_mask=~batch.cand_mask)  # (B, N, d)
        return self.head(torch.cat([h, x], dim=-1)).squeeze(-1)  # (B, N)


# ---------------------------------------------------------------- losses


def shown_bce(logits: torch.Tensor, batch: RequestBatch, unshown_weight: float = 0.0) -> torch.Tensor:
    """BCE of (B, N) candidate logits: mean over the labelled shown positions, plus
    `unshown_weight` x mean over the real candidates that were not shown, as label 0 (in the
    offline protocol an unshown candidate is never a positive; without this term the model
    never sees most of the candidates it must rank below the shown positives). A batch
    without labels gives a zero loss that still has a graph."""
    valid = batch.shown >= 0  # (B, L)
    picked = torch.gather(logits, 1, batch.shown.clamp(min=0))  # (B, L)
    loss = F.binary_cross_entropy_with_logits(picked, batch.labels.clamp(0.0, 1.0), reduction="none")
    total = (loss * valid).sum() / valid.sum().clamp(min=1)
    if unshown_weight > 0:
        shown = torch.zeros_like(batch.cand_mask).scatter_(1, batch.shown.clamp(min=0), valid)  # (B, N)
        neg = batch.cand_mask & ~shown & valid.any(1, keepdim=True)  # (B, N) only in labelled rows
        neg_loss = F.softplus(logits)  # BCE against 0
        total = total + unshown_weight * (neg_loss * neg).sum() / neg.sum().clamp(min=1)
    return total


def _unshown_weight(model: nn.Module, given: float | None) -> float:
    if given is not None:
        return given
    return float(getattr(getattr(model, "module", model), "unshown_weight", 0.0))  # DDP wraps in .module


def pointwise_loss(model: nn.Module, batch: RequestBatch, unshown_weight: float | None = None) -> torch.Tensor:
    """unshown_weight None: the model's own (from PolicyConfig.unshown_weight)."""
    return shown_bce(model(batch), batch, _unshown_weight(model, unshown_weight))


def prm_loss(model: nn.Module, batch: RequestBatch, unshown_weight: float | None = None) -> torch.Tensor:
    # The same objective as the point-wise model; the difference is that PRM's logits for the
    # shown items are computed with every candidate in view.
    return shown_bce(model(batch), batch, _unshown_weight(model, unshown_weight))


# ---------------------------------------------------------------- training loops


def _labelled_rows(data: EncodedRequests) -> np.ndarray:
    return np.flatnonzero((data.shown >= 0).any(1))


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def evaluate_loss(model: nn.Module, loss_fn: Callable[[nn.Module, RequestBatch], torch.Tensor],
                  data: EncodedRequests, batch_size: int) -> float:
    """Mean per-batch loss (weighted by requests) over the labelled rows of `data`."""
    rows, dev = _labelled_rows(data), _device(model)
    if len(rows) == 0:
        return float("nan")
    was = model.training
    model.eval()
    total = 0.0
    with torch.no_grad():
        for i in range(0, len(rows), batch_size):
            idx = rows[i:i + batch_size]
            total += float(loss_fn(model, data.batch(idx, dev))) * len(idx)
    model.train(was)
    return total / len(rows)


def fit_model(model: nn.Module, loss_fn: Callable[[nn.Module, RequestBatch], torch.Tensor],
              train: EncodedRequests, valid: EncodedRequests | None, cfg: TrainConfig,
              what: str, log: Callable[[str], Any] = print) -> list[dict[str, float]]:
    """AdamW for `cfg.aux_epochs` epochs over the labelled rows of `train`, shuffled with
    `cfg.seed`; one log line per epoch. -> per-epoch {epoch, train_loss, valid_loss, samples_per_s}."""
    rows = _labelled_rows(train)
    if len(rows) == 0:
        raise GoalRankInputError(f"{what}: the training split has no shown lists to learn from")
    dev = _device(model)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    rng = np.random.default_rng(cfg.seed)
    history = []
    with torch.random.fork_rng(devices=[]):  # seeded dropout without touching the caller's RNG
        torch.manual_seed(cfg.seed)
        for epoch in range(cfg.aux_epochs):
            model.train()
            order = rng.permutation(rows)
            t0, total = time.perf_counter(), 0.0
            for i in range(0, len(order), cfg.batch_size):
                idx = np.sort(order[i:i + cfg.batch_size])
                loss = loss_fn(model, train.batch(idx, dev))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += float(loss.detach()) * len(idx)
            sps = len(order) / max(time.perf_counter() - t0, 1e-9)
            vloss = evaluate_loss(model, loss_fn, valid, cfg.batch_size) if valid is not None else float("nan")
            rec = {"epoch": epoch + 1, "train_loss": total / len(order), "valid_loss": vloss, "samples_per_s": sps}
            history.append(rec)
            log(f"{what} epoch {epoch + 1}/{cfg.aux_epochs}: train loss {rec['train_loss']:.4f}, "
                f"valid loss {vloss:.4f}, {sps:.0f} samples/s")
    model.eval()
    return history


def train_pointwise(train: EncodedRequests, valid: EncodedRequests | None, model: PointwiseDNN, cfg: TrainConfig,
                    log: Callable[[str], Any] = print) -> list[dict[str, float]]:
    return fit_model(model, pointwise_loss, train, valid, cfg, "pointwise-dnn", log)


def train_prm(train: EncodedRequests, valid: EncodedRequests | None, model: PRM, cfg: TrainConfig,
              log: Callable[[str], Any] = print) -> list[dict[str, float]]:
    return fit_model(model, prm_loss, train, valid, cfg, "prm", log)


# ---------------------------------------------------------------- policies


def _cache_key(model: nn.Module, batch: RequestBatch) -> tuple:
    # The batch's very tensors (not copies) and every version counter: an in-place edit of the
    # batch or an optimiser step on the model invalidates the entry.
    return (tuple(batch), tuple(_version(t) for t in batch if t is not None), tuple(_version(p) for p in model.parameters()))


def _version(t: torch.Tensor) -> int:
    # Inference tensors (made under torch.inference_mode) have no version counter and cannot
    # be edited in place outside it; -1 keeps them cacheable by identity.
    return -1 if t.is_inference() else t._version


def _same(a: tuple, b: tuple) -> bool:
    return all(x is y for x, y in zip(a[0], b[0])) and a[1:] == b[1:]


def model_scores(model: nn.Module) -> Callable[[RequestBatch], torch.Tensor]:
    """A score function running `model` in eval mode (restoring its mode afterwards). The
    last batch's scores are kept on the model, so 'dnn', 'dnn-pl' and MMR over the DNN proposing
    for the same batch (a group, G-E) run the model once."""

    def score(batch: RequestBatch) -> torch.Tensor:
        key = _cache_key(model, batch)
        hit = model.__dict__.get("_last_scores")  # a plain attribute: not in state_dict
        if hit is not None and _same(hit[0], key):
            return hit[1]
        was = model.training
        model.eval()
        try:
            with torch.no_grad():
                out = model(batch.to(_device(model))).to(batch.candidates.device)
        finally:
            model.train(was)
        model.__dict__["_last_scores"] = (key, out)
        return out

    return score


def pointwise_policy(model: PointwiseDNN, cfg: PolicyConfig | None = None, sample: bool = False) -> ScorePolicy:
    """'dnn': sorted by the DNN's scores; 'dnn-pl': `cfg.pl_lists` Plackett-Luce samples."""
    cfg = cfg or PolicyConfig()
    if sample:
        return ScorePolicy("dnn-pl", model_scores(model), sample=True, lists_per_request=cfg.pl_lists,
                           temperature=cfg.pl_temperature)
    return ScorePolicy("dnn", model_scores(model))


def prm_policy(model: PRM) -> ScorePolicy:
    return ScorePolicy("prm", model_scores(model))


class GeneratorEvaluator:
    """Generators propose their default number of lists each; the reward model
    (`score(batch, lists (B, G, L)) -> (B, G)`) picks the best list per request (ties: the
    earlier generator). With n_lists > 1 the n best are returned, best first."""

    lists_per_request = 1

    def __init__(self, generators: list[ListPolicy], reward_model: Any, name: str = "g-e"):
        if not generators:
            raise GoalRankInputError("Generator-Evaluator needs at least one generator policy")
        self.generators, self.reward_model, self.name = generators, reward_model, name

    def candidates(self, batch: RequestBatch, gen: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        """-> (lists (B, G, L), rewards (B, G), G generator names)."""
        lists, names = propose_all(self.generators, batch, gen)
        module = self.reward_model if isinstance(self.reward_model, nn.Module) else None
        was = module.training if module is not None else False
        if was:  # a mode switch walks every submodule (~0.1 ms): serving calls arrive in eval mode
            module.eval()
        try:
            with torch.no_grad():
                rewards = self.reward_model.score(batch, lists)  # (B, G)
        finally:
            if was:
                module.train()
        if rewards.shape != lists.shape[:2]:
            raise GoalRankInputError(f"reward model returned shape {tuple(rewards.shape)}, expected {tuple(lists.shape[:2])}")
        return lists, rewards, names

    def propose(self, batch: RequestBatch, n_lists: int, gen: torch.Generator | None = None) -> torch.Tensor:
        lists, rewards, _ = self.candidates(batch, gen)
        r = torch.nan_to_num(rewards.float(), nan=float("-inf"))
        order = torch.sort(r, dim=1, descending=True, stable=True).indices  # (B, G)
        take = torch.arange(n_lists, device=order.device).clamp(max=order.shape[1] - 1)
        best = order[:, take]  # (B, n_lists); repeats the worst kept list if n_lists > G
        return torch.gather(lists, 1, best[..., None].expand(-1, -1, lists.shape[2]))
