"""The configuration's sections: one dataclass per concern (protocol, generator, reward,
group, train, policies, window, gates), each field with a short help, checked in
`__post_init__`. `goalrank_core.config.GoalRankConfig` holds one of each and does the loading,
overrides and per-source recipes.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from goalrank_core.errors import ConfigError


UNSHOWN = ("auto", "negative", "unknown")


GENERATOR_SELECT = ("hit_rate", "last")  # TrainConfig.generator_select


def _help(text: str, default: Any, **kw: Any) -> Any:
    return field(default=default, metadata={"help": text}, **kw)


def _check(cond: bool, name: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"config '{name}' {msg}")


def _check_transformer(cfg: Any, section: str) -> None:
    """The size fields every Transformer section shares: d_model, n_layers, n_heads, dropout."""
    _check(cfg.d_model >= 4, f"{section}.d_model", f"must be >= 4, got {cfg.d_model}")
    _check(cfg.n_layers >= 1, f"{section}.n_layers", f"must be >= 1, got {cfg.n_layers}")
    _check(cfg.n_heads >= 1 and cfg.d_model % cfg.n_heads == 0, f"{section}.n_heads",
           f"must divide d_model ({cfg.d_model}), got {cfg.n_heads}")
    _check(0.0 <= cfg.dropout < 1.0, f"{section}.dropout", f"must be in [0, 1), got {cfg.dropout}")


@dataclass
class ProtocolConfig:
    """How ratings become impression logs (docs/protocol.md)."""

    slate_len: int = _help("L: items shown per request", 6)
    n_candidates: int = _help("N: candidates per request (shown + retrieved)", 50)
    history_len: int = _help("positives kept in a request's history", 50)
    min_core: int = _help("k-core filter on users and items", 20)
    positive_rating: float = _help("a rating >= this is a positive", 4.0)
    retriever: str = _help("first-stage retriever: itemknn or mf", "itemknn")
    max_users: int = _help("keep at most this many users (0 = all), chosen by seed", 0)
    seed: int = _help("seed for sampling choices in the protocol", 0)
    implicit_positives: int = _help("implicit data (Amazon-Book): positives per slate; the rest are retriever-hard unclicked items", 3)
    negative_pool: int = _help("implicit data: negatives are drawn from the retriever's top this-many unclicked items", 50)
    split: str = _help("--impressions logs: time (a global cut by timestamp: the latest requests test, the ones before "
                       "validate) or user-last (per user: last request test, the one before valid); named data sets "
                       "always use the per-user protocol (docs/protocol.md)", "time")
    valid_share: float = _help("split time: share of the requests, just before the test share, that validates", 0.1)
    test_share: float = _help("split time: share of the requests, the latest, that tests", 0.1)

    def __post_init__(self) -> None:
        _check(self.slate_len >= 1, "protocol.slate_len", f"must be >= 1, got {self.slate_len}")
        _check(
            self.n_candidates >= self.slate_len,
            "protocol.n_candidates",
            f"must be >= slate_len ({self.slate_len}), got {self.n_candidates}",
        )
        _check(self.history_len >= 1, "protocol.history_len", f"must be >= 1, got {self.history_len}")
        _check(self.min_core >= 0, "protocol.min_core", f"must be >= 0, got {self.min_core}")
        _check(self.retriever in ("itemknn", "mf"), "protocol.retriever", f"must be itemknn or mf, got {self.retriever!r}")
        _check(self.max_users >= 0, "protocol.max_users", f"must be >= 0, got {self.max_users}")
        _check(1 <= self.implicit_positives <= self.slate_len, "protocol.implicit_positives",
               f"must be in [1, slate_len={self.slate_len}], got {self.implicit_positives}")
        _check(self.negative_pool >= self.slate_len, "protocol.negative_pool",
               f"must be >= slate_len ({self.slate_len}), got {self.negative_pool}")
        _check(self.split in ("time", "user-last"), "protocol.split", f"must be time or user-last, got {self.split!r}")
        for name in ("valid_share", "test_share"):
            v = getattr(self, name)
            _check(0.0 < v < 1.0, f"protocol.{name}", f"must be in (0, 1), got {v}")
        _check(self.valid_share + self.test_share < 1.0, "protocol.test_share",
               f"plus valid_share ({self.valid_share}) must be < 1 (training needs the rest), got {self.test_share}")


@dataclass
class GeneratorConfig:
    """Size of the GoalRank generator (a Transformer pointer network)."""

    d_model: int = _help("embedding and hidden width", 64)
    n_layers: int = _help("Transformer encoder layers over the candidates", 2)
    n_heads: int = _help("attention heads", 4)
    dropout: float = _help("dropout in the encoder", 0.1)
    ff_mult: int = _help("feed-forward width as a multiple of d_model", 2)
    decoder_layers: int = _help("causal Transformer layers over the items already chosen", 1)
    item_features: bool = _help(
        "add each candidate's collaborative statistics (as reward.item_features: similarity to the user's "
        "history in the low-rank item space, log popularity, CTR) to its embedding", True)
    list_bias: bool = _help(
        "each item already in the list adds a learned amount to every remaining candidate's pointer logit, "
        "from their same category and the cosine of their encodings (saturation, substitutes)", False)

    def __post_init__(self) -> None:
        _check(self.ff_mult >= 1, "generator.ff_mult", f"must be >= 1, got {self.ff_mult}")
        _check(self.decoder_layers >= 1, "generator.decoder_layers", f"must be >= 1, got {self.decoder_layers}")
        _check_transformer(self, "generator")


@dataclass
class RewardConfig:
    """Size of the list-aware reward model."""

    d_model: int = _help("embedding and hidden width", 64)
    n_layers: int = _help("Transformer layers over the list", 2)
    n_heads: int = _help("attention heads", 4)
    dropout: float = _help("dropout", 0.1)
    ff_mult: int = _help("feed-forward width as a multiple of d_model", 2)
    unshown: str = _help(
        "what an unshown candidate's click is: `negative` (0: right when the shown list is what the user "
        "chose to consume, as in impressions the protocol builds from ratings or interactions), "
        "`unknown` (never labelled: right for impression logs, where a logging policy chose the list "
        "and an unshown item might have been clicked) or `auto` (negative for a named data set, "
        "unknown for --impressions, each with its reward recipe for the fields left at their defaults: "
        "`config.SOURCE_RECIPES`, `GoalRankConfig.for_source`). Only with `negative` do "
        "`augment_lists` and `group_lists` apply", "auto")
    augment_lists: int = _help(
        "with unshown = negative: extra training lists per request mixing shown items with unshown "
        "candidates (label 0), so the model can score lists that were never logged", 1)
    group_lists: int = _help(
        "with unshown = negative: lists per training request drawn from the group proposers' lists "
        "(auxiliary policies and supervised-generator samples), labelled from the log (unshown = 0), "
        "so the model learns to rank the kind of lists it will score (0 = off; > 0 fits the policies "
        "before the reward model)", 4)
    context_layers: int = _help(
        "Transformer layers over [user, all N candidates] before the list is encoded, so each list "
        "item is judged against the whole candidate set, as the generator sees it (0 = off: as good on "
        "the simulator at a tenth of the cost)", 0)
    init_from_supervised: bool = _help(
        "start the reward model's embeddings and context layers from the supervised generator's "
        "embeddings and encoder (as RLHF reward models start from the SFT model), when their shapes "
        "match (same d_model, n_heads, ff_mult, and context_layers == generator.n_layers); off by "
        "default: that generator learnt the logged positives, the very bias the reward model must not copy)", False)
    list_weight: float = _help(
        "weight of the list-ranking term beside the BCE: within each training request, the model's "
        "own pi_ref over its labelled lists (normalised scores, softmax) is fitted to the pi_ref of "
        "their logged DCG, so the model learns to order lists, which is how G-E and pi_ref use it "
        "(0 = BCE only; 1 helps G-E on ML-100K but hurts it on Amazon-Book and on the synthetic "
        "context-effect data: docs/architecture.md)", 0.0)
    pairwise: bool = _help(
        "add a pairwise context term to each item's click logit: the summed effect of every earlier "
        "list item, from their same-category flag, similarity, attractiveness and distance (category "
        "saturation, substitutes and complements, a reader who stops after a click)", True)
    causal: bool = _help(
        "the list encoder lets item p attend to the user and the items above it only (a top-down "
        "reader, as click models assume); false: every item of the list", True)
    item_features: bool = _help(
        "give each candidate the heuristic policies' collaborative statistics (similarity to the user's "
        "history in the low-rank item space of all training positives, log popularity, CTR) as inputs of "
        "its vector and its click logit: the logged lists label only L items per request, these summarise "
        "every training positive, so unshown candidates are judged from more than an id embedding", True)
    examination: bool = _help(
        "a cascade reader on top of the click model (as DCM and DBN click models have): an item is "
        "clicked only if the reader got to it, and after each item she reads on with a learnt probability "
        "that depends on whether she clicked it and on the item (satisfied by a good item, put off by a "
        "dull one); P(click at k) = P(examined k) * attraction(k). Stop probabilities start near 0, so a "
        "world without a cascade loses nothing", False)
    list_value: str = _help(
        "how a list's predicted clicks add up to its reward: `dcg` (sum_k p_k / log2(k + 2): right when the "
        "labels carry no position effect, as in slates built from ratings, and the metric is NDCG) or "
        "`clicks` (sum_k p_k, the expected number of clicks: right for impression logs, whose clicks "
        "already fall with position, so the model's p_k has the position effect in it and a DCG weight "
        "would count it twice)", "dcg")
    folds: int = _help(
        "cross-fitting: K reward models, member k trained on the training requests outside fold k "
        "(a hash of request_id); a training request's group is scored by the member that never saw "
        "it, anything else (G-E, serving) by the members' mean (1 = one model that also scores its "
        "own training requests)", 2)

    exposure_prior: bool = _help(
        "a point-wise head trained on every candidate (a logged click 1, anything else 0: what the "
        "log says about which items a user takes, exposure included) whose logit, detached, is an input "
        "of each list item's click logit with a learnt weight; the click model itself still learns from "
        "observed positions only, so an unshown candidate gets an informed prior instead of an "
        "arbitrary score", False)
    exposure_target: str = _help(
        "what the exposure prior learns over all candidates: `click` (the log shows a click on it) or "
        "`shown` (the logging policy showed it: where that policy knew something about the user, being "
        "chosen is itself evidence of relevance, with ten times the positives of clicks)", "click")

    feedback: dict[str, float] = field(default_factory=dict, metadata={"help": (
        "further feedback types the reward model predicts, each a `labels_<name>` impressions column "
        "(values in [0, 1]) with its weight in the list reward: score = sum_k dcg_k (p_click,k + "
        "sum_f w_f p_f,k), e.g. {labels_like: 0.5, labels_star: 0.2}; {} = `labels` alone")})

    def __post_init__(self) -> None:
        _check(isinstance(self.feedback, dict), "reward.feedback",
               f"must be a mapping of labels_<name> column to weight, got {self.feedback!r}")
        for name, w in self.feedback.items():
            _check(isinstance(name, str) and name.startswith("labels_") and len(name) > len("labels_"),
                   "reward.feedback", f"keys must be labels_<name> columns, got {name!r}")
            _check(isinstance(w, (int, float)) and not isinstance(w, bool) and w == w and 0 <= w < float("inf"),
                   f"reward.feedback.{name}", f"must be a finite weight >= 0, got {w!r}")
        _check(isinstance(self.folds, int) and self.folds >= 1, "reward.folds", f"must be an integer >= 1, got {self.folds!r}")
        _check(self.ff_mult >= 1, "reward.ff_mult", f"must be >= 1, got {self.ff_mult}")
        _check(self.exposure_target in ("click", "shown"), "reward.exposure_target",
               f"must be click or shown, got {self.exposure_target!r}")
        _check(self.list_value in ("dcg", "clicks"), "reward.list_value",
               f"must be dcg or clicks, got {self.list_value!r}")
        _check(self.unshown in UNSHOWN, "reward.unshown", f"must be one of {', '.join(UNSHOWN)}, got {self.unshown!r}")
        _check(self.augment_lists >= 0, "reward.augment_lists", f"must be >= 0, got {self.augment_lists}")
        _check(self.group_lists >= 0, "reward.group_lists", f"must be >= 0, got {self.group_lists}")
        _check(self.context_layers >= 0, "reward.context_layers", f"must be >= 0, got {self.context_layers}")
        _check(self.list_weight >= 0, "reward.list_weight", f"must be >= 0, got {self.list_weight}")
        _check_transformer(self, "reward")

    @property
    def feedback_names(self) -> tuple[str, ...]:
        """The `labels_<name>` columns the reward model predicts, in a fixed (sorted) order."""
        return tuple(sorted(self.feedback))

    @property
    def labelled_lists(self) -> tuple[int, int]:
        """(augment_lists, group_lists) in effect: both 0 unless unshown candidates are negatives
        (an unresolved `auto` counts as unknown: never invent a label)."""
        return (self.augment_lists, self.group_lists) if self.unshown == "negative" else (0, 0)


@dataclass
class GroupConfig:
    """The group B of lists per request and the reference policy pi_ref."""

    size: int = _help("|B|: lists per request after deduplication", 20)
    generator_samples: int = _help("lists sampled from the current generator per request", 8)
    tau: float = _help("softmax temperature of pi_ref", 1.0)
    eps: float = _help("added to the group std before dividing", 1e-6)
    rounds: int = _help("generate -> score -> train rounds (generator samples refresh each round; "
                        "the named data sets' recipe keeps 1: config.SOURCE_RECIPES)", 2)
    logged_list: bool = _help(
        "put a training request's logged list (the behaviour policy's proposal) first in its group; "
        "training groups only, never used to rank", True)
    search_lists: bool = _help(
        "put a list built by greedy search under the reward model (goalrank_core/search.py) in each "
        "training group, the one proposal that could beat every proposer; training only, never served "
        "(the in-process fit and the daily flow's score stage). "
        "Off by default; impression logs turn it on (config.SOURCE_RECIPES): there, with the item "
        "features, the search finds lists as good as the best proposer's (docs/simulator.md)", False)
    search_shortlist: int = _help("the search considers each request's top this-many candidates by the "
                                  "reward model's one-item score (0 = all N)", 0)
    search_sweeps: int = _help(
        "rounds of local search after the greedy construction (search.py: each position tries the list's "
        "own items by swap and the L best other candidates by replacement, and keeps what the reward model "
        "scores higher); greedy alone cannot see what an item does to the items below it. Each round costs "
        "about one more greedy search", 0)

    def __post_init__(self) -> None:
        _check(self.size >= 1, "group.size", f"must be >= 1, got {self.size}")
        _check(self.generator_samples >= 0, "group.generator_samples", f"must be >= 0, got {self.generator_samples}")
        _check(self.tau > 0, "group.tau", f"must be > 0, got {self.tau}")
        _check(self.eps > 0, "group.eps", f"must be > 0, got {self.eps}")
        _check(self.rounds >= 1, "group.rounds", f"must be >= 1, got {self.rounds}")
        _check(self.search_sweeps >= 0, "group.search_sweeps", f"must be >= 0, got {self.search_sweeps}")
        _check(self.search_shortlist >= 0, "group.search_shortlist", f"must be >= 0, got {self.search_shortlist}")


@dataclass
class TrainConfig:
    """Optimisation settings shared by every trained model."""

    epochs: int = _help("epochs of generator training per round", 2)
    reward_epochs: int = _help("epochs of reward-model training (best epoch on valid kept)", 8)
    aux_epochs: int = _help("epochs of the neural auxiliary policies", 3)
    batch_size: int = _help("requests per batch (per worker under DDP)", 256)
    lr: float = _help("AdamW learning rate", 2e-3)
    weight_decay: float = _help("AdamW weight decay", 1e-4)
    supervised_weight: float = _help("weight of the supervised term on logged positives", 0.0)
    generator_select: str = _help(
        "which epoch of each round's group-relative training is kept: `hit_rate` (the best greedy hit rate on "
        "the valid split's logged labels) or `last` (the last epoch: the loss is pi_ref's cross-entropy, and "
        "logged labels cannot tell a better list from one that looks logged, so hit rate keeps the epoch "
        "closest to the warm start)", "hit_rate")
    seed: int = _help("seed for weights, sampling and shuffling", 0)
    num_workers: int = _help("Ray Train DDP workers", 2)
    warm_epochs: int = _help("generator epochs per round when warm-started from the champion (daily runs)", 1)
    warm_reward_epochs: int = _help("reward-model epochs when warm-started from the champion (daily runs)", 2)

    def __post_init__(self) -> None:
        for name in ("epochs", "reward_epochs", "aux_epochs", "batch_size", "num_workers", "warm_epochs",
                     "warm_reward_epochs"):
            v = getattr(self, name)
            _check(isinstance(v, int) and v >= 1, f"train.{name}", f"must be an integer >= 1, got {v!r}")
        _check(self.lr > 0, "train.lr", f"must be > 0, got {self.lr}")
        _check(self.weight_decay >= 0, "train.weight_decay", f"must be >= 0, got {self.weight_decay}")
        _check(self.supervised_weight >= 0, "train.supervised_weight", f"must be >= 0, got {self.supervised_weight}")
        _check(self.generator_select in GENERATOR_SELECT, "train.generator_select",
               f"must be one of {', '.join(GENERATOR_SELECT)}, got {self.generator_select!r}")

    @property
    def keep_best_generator(self) -> bool:
        """Whether group-relative training keeps its best-on-valid epoch (else its last one)."""
        return self.generator_select != "last"


@dataclass
class PolicyConfig:
    """Auxiliary policies (the group's heuristic and light neural proposers) and the
    point-wise DNN / PRM baselines (goalrank_core/policies.py, baselines.py)."""

    auxiliary: str = _help("comma-separated policies proposing lists for the group and for G-E",
                           "popularity,ctr,mmr,history,random,dnn,dnn-pl")
    random_lists: int = _help("lists per request from the random policy", 2)
    pl_lists: int = _help("Plackett-Luce lists per request sampled from the point-wise DNN", 4)
    pl_temperature: float = _help("softmax temperature of the Plackett-Luce samples", 1.0)
    ctr_prior: float = _help("pseudo-impressions at the global CTR added to every item's CTR", 10.0)
    emb_dim: int = _help("width of the item embeddings factorised from training positives", 32)
    latent_categories: int = _help(
        "when the items carry no category (no items file, or every category 0): cluster the items' embeddings "
        "(factorised as for `emb_dim`) into this many categories, so the category-aware parts (the reward "
        "model's context term, the generator's list-context term, MMR) still see which items are alike "
        "(goalrank_core/latent_categories.py). 0 = off: such items stay without a category. "
        "Impression logs turn it on (config.SOURCE_RECIPES)", 0)
    mmr_lambda: float = _help("MMR trade-off: 1 = relevance only, 0 = diversity only", 0.7)
    mmr_similarity: str = _help("MMR similarity: category, embedding or auto (category if any)", "auto")
    mmr_relevance: str = _help("score policy giving MMR's relevance: popularity, ctr, history or dnn", "dnn")
    dnn_dim: int = _help("embedding width of the point-wise DNN", 32)
    dnn_hidden: int = _help("hidden width of the point-wise DNN's MLP", 64)
    prm_d_model: int = _help("width of the PRM re-scorer", 32)
    prm_layers: int = _help("Transformer layers of the PRM", 1)
    prm_heads: int = _help("attention heads of the PRM", 2)
    dropout: float = _help("dropout in the point-wise DNN and the PRM", 0.1)
    unshown_weight: float = _help(
        "weight of the BCE term treating unshown candidates as label 0 in the DNN and PRM losses "
        "(0 = shown labels only; unshown candidates are never positives in the offline protocol)", 1.0)

    def __post_init__(self) -> None:
        names = self.auxiliary_names()
        _check(len(names) >= 1 and all(n.replace("-", "").replace("_", "").isalnum() for n in names),
               "policies.auxiliary", f"must be a comma-separated list of policy names, got {self.auxiliary!r}")
        _check(len(set(names)) == len(names), "policies.auxiliary", f"names a policy twice: {self.auxiliary!r}")
        for name in ("random_lists", "pl_lists", "emb_dim", "dnn_dim", "dnn_hidden", "prm_d_model", "prm_layers", "prm_heads"):
            v = getattr(self, name)
            _check(isinstance(v, int) and v >= 1, f"policies.{name}", f"must be an integer >= 1, got {v!r}")
        _check(self.prm_d_model % self.prm_heads == 0, "policies.prm_heads",
               f"must divide prm_d_model ({self.prm_d_model}), got {self.prm_heads}")
        _check(self.pl_temperature > 0, "policies.pl_temperature", f"must be > 0, got {self.pl_temperature}")
        _check(self.ctr_prior >= 0, "policies.ctr_prior", f"must be >= 0, got {self.ctr_prior}")
        _check(self.latent_categories >= 0, "policies.latent_categories", f"must be >= 0, got {self.latent_categories}")
        _check(0.0 <= self.mmr_lambda <= 1.0, "policies.mmr_lambda", f"must be in [0, 1], got {self.mmr_lambda}")
        _check(self.mmr_similarity in ("auto", "category", "embedding"), "policies.mmr_similarity",
               f"must be auto, category or embedding, got {self.mmr_similarity!r}")
        _check(self.mmr_relevance in ("popularity", "ctr", "history", "dnn"), "policies.mmr_relevance",
               f"must be popularity, ctr, history or dnn, got {self.mmr_relevance!r}")
        _check(0.0 <= self.dropout < 1.0, "policies.dropout", f"must be in [0, 1), got {self.dropout}")
        _check(self.unshown_weight >= 0, "policies.unshown_weight", f"must be >= 0, got {self.unshown_weight}")

    def auxiliary_names(self) -> list[str]:
        return [n.strip() for n in self.auxiliary.split(",") if n.strip()]


@dataclass
class WindowConfig:
    """The sliding window of a daily run on date-partitioned impressions (goalrank_core.partitions)."""

    days: int = _help("W: a run for date D reads the partitions of [D - W, D - 1]", 30)
    test_fraction: float = _help("share of the last day's requests (the later ones) kept as the test split; "
                                 "the rest of the last day validates", 0.5)

    def __post_init__(self) -> None:
        _check(isinstance(self.days, int) and self.days >= 2, "window.days",
               f"must be an integer >= 2 (a training day and the validation day), got {self.days!r}")
        _check(0.0 < self.test_fraction < 1.0, "window.test_fraction", f"must be in (0, 1), got {self.test_fraction}")


@dataclass
class GateConfig:
    """Data gates on the newest partition (D - 1) before any training (goalrank_core.gates)."""

    enabled: bool = _help("run the gates (a failed gate stops the run before training)", True)
    min_rows: int = _help("the new partition needs at least this many requests", 1)
    trailing_days: int = _help("the row-count check compares with the mean of this many earlier partitions", 7)
    min_row_ratio: float = _help("new rows / trailing mean must be >= this", 0.5)
    max_row_ratio: float = _help("new rows / trailing mean must be <= this", 2.0)
    min_positive_share: float = _help("share of shown items with a positive label must be >= this", 0.005)
    max_positive_share: float = _help("share of shown items with a positive label must be <= this", 0.95)
    max_unknown_item_share: float = _help(
        "share of candidate slots whose item never occurs in the window's training partitions must be <= this", 0.5)

    def __post_init__(self) -> None:
        _check(self.min_rows >= 1, "gates.min_rows", f"must be >= 1, got {self.min_rows}")
        _check(self.trailing_days >= 1, "gates.trailing_days", f"must be >= 1, got {self.trailing_days}")
        _check(0.0 <= self.min_row_ratio <= self.max_row_ratio, "gates.min_row_ratio",
               f"must be in [0, max_row_ratio={self.max_row_ratio}], got {self.min_row_ratio}")
        _check(0.0 <= self.min_positive_share <= self.max_positive_share <= 1.0, "gates.min_positive_share",
               f"need 0 <= min_positive_share <= max_positive_share <= 1, got {self.min_positive_share}, "
               f"{self.max_positive_share}")
        _check(0.0 <= self.max_unknown_item_share <= 1.0, "gates.max_unknown_item_share",
               f"must be in [0, 1], got {self.max_unknown_item_share}")
