"""Synthetic impression logs from a known latent model, plus an oracle with the true probabilities.

    result = generate_logs(cfg.generator, Path("runs/demo/logs"), Path("runs/demo/oracle.parquet"))

Writes ``out_dir/dt=YYYY-MM-DD/part-NNNNN.parquet`` (``files_per_day`` parts per day, rows in time order) with the
columns of ``configs/features/behaviour_logs.yaml`` (see :data:`LOG_SCHEMA`), and a separate oracle Parquet
(:data:`ORACLE_SCHEMA`) that maps every ``request_id`` to the probabilities its labels were drawn from. Because the
labels are Bernoulli draws from exactly those probabilities, the oracle's AUC is the best any model can reach.

The latent model (everything is drawn from ``cfg.seed``, so the same config gives byte-identical tables):

* categories have centroid vectors; an item's embedding is its category's centroid plus noise; a user's interest
  vector mixes the centroids of two favourite categories plus noise. ``match = <interest, item>``.
* items have a Zipf-like popularity, a quality, a lognormal price around their category's level and a fixed seller
  (sellers have a trust level). Users have an activity level (how often they are shown items), a primary device, and
  click / buy propensities.
* an impression picks a user by activity, then an item either from one of the user's favourite categories or from the
  whole catalogue (both popularity-weighted), a feed slot (top slots are more frequent) and a time of day (diurnal).
* ``p_click = sigmoid(b + match + popularity + quality + user + position bias + hour + device + bait boost)``
* ``p_conversion | click = sigmoid(b' + other projection of interest + quality + seller trust - relative price + user
  + device - bait penalty)``; ``log1p(dwell) | click ~ N(mu, 0.5)`` (symmetrically truncated) with ``mu`` from match,
  quality and bait. Carts: always when purchased, else with a probability that grows with the conversion logit.
* ``conflict`` makes a nested share of items (``0.25 * conflict``) click-bait: a large click boost but low conversion
  and short dwell, so the CTR task and the CVR / dwell tasks disagree. ``conflict=0`` gives aligned tasks.
* ``repeat`` (0 = off) adds return behaviour: a share ``REPEAT_SHARE * repeat`` of impressions re-shows an item the
  user clicked earlier (newest first more likely; a user with no earlier click gets the ordinary draw), and the true
  logits gain ``repeat * (REPEAT_CLICK_ITEM * clicked before + REPEAT_CLICK_CATEGORY * log1p(earlier clicks in the
  item's category))`` for clicks and ``repeat * (REPEAT_BUY_ITEM * clicked before + REPEAT_REBUY * bought before)``
  for purchases. The oracle holds these terms, so match features and target attention have something true to find.
  Labels then depend on earlier labels, so this path simulates hour by hour (vectorised within the hour): an
  impression's pull counts the user's events up to the start of its hour.
* the intercepts ``b``, ``b'`` are solved so that the mean CTR is ``TARGET_CTR`` and the mean CVR among clicks is
  ``TARGET_CVR``, whatever the other knobs are (with ``repeat`` on: by bisection over re-runs of the simulation).

Behaviour sequences (``click_seq``, ``cart_seq``, ``purchase_seq``) hold the items the user acted on strictly before
the impression's timestamp (same-millisecond events excluded), newest first, capped at ``cfg.max_seq_length``; history
accumulates across days. ``click_category_seq`` holds the categories of ``click_seq``'s items, position by position
(what a "category in the user's click history" match feature reads). Everything is vectorised numpy: labels do not
depend on the sequences, so all labels are drawn first and the sequences are then cut out of per-user event arrays
with ``searchsorted``.
"""

from __future__ import annotations

import datetime as dt
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field

from features.validate import SUCCESS_MARKER


class GeneratorConfig(BaseModel):
    """Built-in behaviour-log generator (a known latent model, so the best reachable AUC is known)."""

    model_config = ConfigDict(extra="forbid")

    seed: int = 0
    start_date: str = "2026-01-01"
    num_days: int = Field(default=4, ge=2)
    impressions_per_day: int = Field(default=50_000, gt=0)
    num_users: int = Field(default=5_000, gt=0)
    num_items: int = Field(default=20_000, gt=0)
    num_categories: int = Field(default=200, gt=0)
    num_sellers: int = Field(default=2_000, gt=0)
    latent_dim: int = Field(default=8, gt=0)
    files_per_day: int = Field(default=2, gt=0)
    conflict: float = Field(
        default=0.5, ge=0, le=1, description="share/strength of click-bait items: 0 = aligned tasks"
    )
    max_seq_length: int = Field(default=50, gt=0, description="cap on each behaviour sequence written to the logs")
    repeat: float = Field(
        default=0.0,
        ge=0,
        le=1,
        description="users return to their own history: a share of impressions re-shows an item the user clicked "
        "before, and earlier clicks / purchases of the item and clicks in its category raise click and purchase "
        "odds; 0 = none",
    )


F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]
Bool = npt.NDArray[np.bool_]

MS_PER_HOUR = 3_600_000
MS_PER_DAY = 24 * MS_PER_HOUR

TARGET_CTR = 0.05
"""Mean p_click over all impressions (the click intercept is solved for it)."""
TARGET_CVR = 0.12
"""Mean p_conversion among clicks, i.e. sum(p_click * p_conversion) / sum(p_click)."""

DEVICES = ("ios", "android", "web", "mweb")
_DEVICE_SHARE = np.array([0.38, 0.37, 0.15, 0.10])
_DEVICE_CLICK = np.array([0.10, 0.0, -0.10, -0.05])  # app users browse the feed more eagerly
_DEVICE_CONV = np.array([0.10, 0.0, 0.15, -0.20])  # desktop checkout is easiest, mobile web hardest
_DEVICE_DWELL = np.array([0.0, 0.0, 0.15, -0.05])
_PRIMARY_DEVICE_SHARE = 0.85  # the rest of a user's impressions come from a random device

NUM_SLOTS = 20
_SLOT_DECAY = 0.9  # p(slot) ~ 0.9**slot: users rarely scroll far down
_POSITION_BIAS = 0.6  # click logit -= 0.6 * log1p(slot)

# Diurnal traffic: a lunch bump and an evening peak.
_HOURS = np.arange(24, dtype=np.float64)
_HOUR_SHARE = 0.15 + np.exp(-((_HOURS - 20.5) ** 2) / 10.0) + 0.5 * np.exp(-((_HOURS - 12.5) ** 2) / 4.0)
_HOUR_SHARE /= _HOUR_SHARE.sum()
_HOUR_CLICK = 0.12 * np.cos(2 * np.pi * (_HOURS - 21.0) / 24.0)  # evening browsing is more leisurely

_FAVOURITE_SHARES = (0.4, 0.2)  # retrieval: share of impressions from favourite category 1 and 2; rest: catalogue
_BAIT_MAX_SHARE = 0.25
_DWELL_SIGMA = 0.5
_DWELL_TRUNC = 2.5  # |noise| <= 2.5 sigma: keeps log1p(dwell) > 0 and, being symmetric, the mean exactly mu
_DWELL_MU_RANGE = (1.5, 5.5)  # mu - 2.5 * 0.5 >= 0.25, so dwell >= expm1(0.25) > 0

# Return behaviour (``repeat``): share of re-shown items and the pull of the user's own history, per unit of repeat.
REPEAT_SHARE = 0.3
REPEAT_CLICK_ITEM = 1.5
REPEAT_CLICK_CATEGORY = 0.5
REPEAT_BUY_ITEM = 0.8
REPEAT_REBUY = 1.5
_REPEAT_RECENCY = 0.3  # a re-shown item is the k-th newest earlier click with probability ~ 0.3 * 0.7**k

# Independent random streams, so e.g. changing impressions_per_day leaves the latent world unchanged.
_STREAM_WORLD, _STREAM_IMPRESSIONS, _STREAM_LABELS, _STREAM_FEATURES, _STREAM_REPEAT = 1, 2, 3, 4, 5

LOG_SCHEMA = pa.schema(
    [
        ("request_id", pa.int64()),
        ("ts", pa.timestamp("ms")),
        ("user_id", pa.int64()),
        ("item_id", pa.int64()),
        ("category_id", pa.int64()),
        ("seller_id", pa.int64()),
        ("hour", pa.int32()),
        ("device", pa.string()),
        ("slot", pa.int32()),
        ("price", pa.float32()),
        ("item_ctr_7d", pa.float32()),
        ("user_activity", pa.float32()),
        ("click_seq", pa.list_(pa.int64())),
        ("cart_seq", pa.list_(pa.int64())),
        ("purchase_seq", pa.list_(pa.int64())),
        ("click_category_seq", pa.list_(pa.int64())),
        ("click", pa.int8()),
        ("conversion", pa.int8()),
        ("dwell_seconds", pa.float32()),
    ]
)
"""Columns and Arrow types of every log part file."""

ORACLE_SCHEMA = pa.schema(
    [
        ("request_id", pa.int64()),
        ("p_click", pa.float64()),
        ("p_conversion", pa.float64()),
        ("p_ctcvr", pa.float64()),
        ("dwell_log_mean", pa.float64()),
    ]
)
"""The oracle: the true probabilities of each request (p_conversion is given a click)."""


@dataclass(frozen=True)
class GenerationResult:
    """What :func:`generate_logs` wrote."""

    files: list[Path]  # every part file written, in (date, part) order
    rows: int
    dates: list[str]  # 'YYYY-MM-DD', sorted
    oracle_path: Path
    seconds: float


@dataclass(frozen=True)
class _World:
    """The latent model: per-user and per-item parameters (index = id)."""

    # users
    interest: F64  # [U, d]
    conv_interest: F64  # [U, d]: interest @ W, the purchase-side projection
    activity: F64  # [U] sampling weight of the user's impressions
    favourite: I64  # [U, 2] favourite categories
    primary_device: I64  # [U]
    user_click: F64  # [U] click propensity
    user_buy: F64  # [U] purchase propensity
    # items
    embedding: F64  # [I, d]
    category: I64  # [I]
    seller: I64  # [I]
    popularity: F64  # [I] sampling weight, sums to 1
    log_pop_z: F64  # [I] standardised log popularity
    quality: F64  # [I]
    price: F64  # [I]
    rel_log_price: F64  # [I] log price minus the category's level
    bait: Bool  # [I] click-bait items
    seller_trust: F64  # [I] the item's seller's trust


@dataclass(frozen=True)
class _Impressions:
    """Sampled impressions, sorted by time (row index = global time order)."""

    rel_ms: I64  # ms since start_date 00:00
    user: I64
    item: I64
    slot: I64
    device: I64
    hour: I64


@dataclass(frozen=True)
class _Truth:
    """Per-impression true probabilities and the item terms needed for item_ctr_7d."""

    p_click: F64
    p_conversion: F64
    conv_logit: F64
    dwell_log_mean: F64
    item_click_base: F64  # [I] the item's base click rate (item terms, average context)


def _sigmoid(x: F64) -> F64:
    return np.exp(-np.logaddexp(0.0, -x))


def _rng(seed: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, stream])


def _solve_intercept(z: F64, target: float, weights: F64 | None = None) -> float:
    """The b with weighted mean sigmoid(z + b) == target (bisection: the mean is monotone in b)."""
    # An even stride of <= ~200k rows pins b to ~1e-3 and keeps this cheap; a stride (not a prefix) because rows are
    # in time order and a prefix would over-weight the first day's hours.
    step = max(1, len(z) // 200_000)
    z = z[::step]
    w = np.ones_like(z) if weights is None else weights[::step]
    lo, hi = -30.0, 30.0
    total = float(w.sum())
    for _ in range(40):
        mid = 0.5 * (lo + hi)
        if float((w * _sigmoid(z + mid)).sum()) / total < target:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def _zipf_weights(rng: np.random.Generator, n: int, exponent: float, offset: float) -> F64:
    """Zipf-like weights over n ids with the ranks randomly permuted (so id order carries no popularity)."""
    ranks = rng.permutation(n).astype(np.float64)
    w = (ranks + offset) ** -exponent
    return w / w.sum()


def _sample(rng: np.random.Generator, cum: F64, size: int) -> I64:
    """Draw indices from the distribution whose cumulative sum is ``cum`` (last value 1)."""
    idx = np.searchsorted(cum, rng.random(size) * cum[-1], side="right")
    return np.minimum(idx, len(cum) - 1).astype(np.int64)


def _build_world(cfg: GeneratorConfig) -> _World:
    rng = _rng(cfg.seed, _STREAM_WORLD)
    d, n_users, n_items, n_cats = cfg.latent_dim, cfg.num_users, cfg.num_items, cfg.num_categories

    # Categories: centroids of unit-ish norm, Zipf-like sizes, a price level each.
    centroid = rng.normal(0.0, 1.0 / np.sqrt(d), size=(n_cats, d))
    cat_weight = _zipf_weights(rng, n_cats, exponent=0.8, offset=3.0)
    cat_log_price = rng.normal(3.0, 0.8, size=n_cats)

    category = _sample(rng, np.cumsum(cat_weight), n_items)
    embedding = centroid[category] + rng.normal(0.0, 0.5 / np.sqrt(d), size=(n_items, d))
    popularity = _zipf_weights(rng, n_items, exponent=0.9, offset=5.0)
    log_pop = np.log(popularity)
    log_pop_z = (log_pop - log_pop.mean()) / log_pop.std()
    quality = rng.normal(0.0, 1.0, size=n_items)
    rel_log_price = rng.normal(0.0, 0.5, size=n_items)
    price = np.exp(cat_log_price[category] + rel_log_price)

    seller_weight = _zipf_weights(rng, cfg.num_sellers, exponent=0.7, offset=2.0)
    seller = _sample(rng, np.cumsum(seller_weight), n_items)
    seller_trust = rng.normal(0.0, 0.6, size=cfg.num_sellers)[seller]

    # Bait: one fixed uniform per item compared with a share that grows with conflict, so the bait sets are nested
    # across conflict values (the same seed at higher conflict only adds bait items).
    bait = rng.random(n_items) < _BAIT_MAX_SHARE * cfg.conflict

    # Users: two favourite categories taken from items drawn by popularity, so a favourite is never empty and
    # tastes follow the catalogue's mass.
    pop_cum = np.cumsum(popularity)
    favourite = category[_sample(rng, pop_cum, 2 * n_users)].reshape(n_users, 2)
    interest = (
        centroid[favourite[:, 0]]
        + 0.5 * centroid[favourite[:, 1]]
        + rng.normal(0.0, 0.4 / np.sqrt(d), size=(n_users, d))
    )
    # Purchase-side projection: half identity, half a random rotation, so buying tastes overlap clicking tastes
    # without being the same function.
    rotation, _ = np.linalg.qr(rng.normal(size=(d, d)))
    conv_interest = interest @ (0.5 * np.eye(d) + 0.5 * rotation)
    activity = rng.lognormal(0.0, 1.0, size=n_users)
    primary_device = _sample(rng, np.cumsum(_DEVICE_SHARE), n_users)
    user_click = rng.normal(0.0, 0.4, size=n_users)
    user_buy = rng.normal(0.0, 0.4, size=n_users)

    return _World(
        interest=interest,
        conv_interest=conv_interest,
        activity=activity / activity.sum(),
        favourite=favourite,
        primary_device=primary_device,
        user_click=user_click,
        user_buy=user_buy,
        embedding=embedding,
        category=category,
        seller=seller,
        popularity=popularity,
        log_pop_z=log_pop_z,
        quality=quality,
        price=price,
        rel_log_price=rel_log_price,
        bait=bait,
        seller_trust=seller_trust,
    )


def _sample_impressions(cfg: GeneratorConfig, world: _World) -> _Impressions:
    rng = _rng(cfg.seed, _STREAM_IMPRESSIONS)
    n = cfg.num_days * cfg.impressions_per_day
    user = _sample(rng, np.cumsum(world.activity), n)

    # Items: popularity-weighted within a favourite category, or over the whole catalogue. Within-category sampling
    # is one searchsorted over the popularity cumsum of the items sorted by category: a draw for category c is a
    # uniform point in c's stretch [cum_start[c], cum_end[c]) of that cumsum.
    by_cat = np.argsort(world.category, kind="stable")
    cum = np.cumsum(world.popularity[by_cat])
    cat_mass = np.bincount(world.category, weights=world.popularity, minlength=cfg.num_categories)
    cum_end = np.cumsum(cat_mass)
    cum_start = cum_end - cat_mass
    source = _sample(rng, np.cumsum([*_FAVOURITE_SHARES, 1.0 - sum(_FAVOURITE_SHARES)]), n)  # 0, 1: favourite; 2
    from_fav = source < 2
    fav_cat = world.favourite[user[from_fav], source[from_fav]]
    target = cum_start[fav_cat] + rng.random(int(from_fav.sum())) * cat_mass[fav_cat]
    item = np.empty(n, dtype=np.int64)
    pos = np.minimum(np.searchsorted(cum, target, side="right"), len(cum) - 1)
    item[from_fav] = by_cat[pos]
    item[~from_fav] = _sample(rng, np.cumsum(world.popularity), int((~from_fav).sum()))

    slot = _sample(rng, np.cumsum(_SLOT_DECAY ** np.arange(NUM_SLOTS)), n)
    device = np.where(
        rng.random(n) < _PRIMARY_DEVICE_SHARE,
        world.primary_device[user],
        rng.integers(0, len(DEVICES), size=n),
    )
    day = np.repeat(np.arange(cfg.num_days, dtype=np.int64), cfg.impressions_per_day)
    hour = _sample(rng, np.cumsum(_HOUR_SHARE), n)
    rel_ms = day * MS_PER_DAY + hour * MS_PER_HOUR + rng.integers(0, MS_PER_HOUR, size=n)

    order = np.argsort(rel_ms, kind="stable")  # rows in time order; days stay contiguous
    return _Impressions(
        rel_ms=rel_ms[order],
        user=user[order],
        item=item[order],
        slot=slot[order],
        device=device[order],
        hour=hour[order],
    )


@dataclass(frozen=True)
class _Logits:
    """Per-impression logits without their intercepts (and without the pull of the user's own history)."""

    click: F64
    conversion: F64
    dwell_mu: F64  # before clipping
    item_click: F64  # [I] the item terms of the click logit
    context_click_mean: float


def _logits(cfg: GeneratorConfig, world: _World, user: I64, item: I64, slot: I64, hour: I64, device: I64) -> _Logits:
    match = 1.2 * np.einsum("nd,nd->n", world.interest[user], world.embedding[item])
    conv_match = 1.2 * np.einsum("nd,nd->n", world.conv_interest[user], world.embedding[item])
    bait = world.bait[item].astype(np.float64)
    c = cfg.conflict

    item_click = 0.25 * world.log_pop_z + 0.4 * world.quality + (1.0 + 1.5 * c) * world.bait
    context_click = (
        match + world.user_click[user] - _POSITION_BIAS * np.log1p(slot) + _HOUR_CLICK[hour] + _DEVICE_CLICK[device]
    )
    z_conv = (
        conv_match
        + 0.6 * world.quality[item]
        + 0.5 * world.seller_trust[item]
        - 0.5 * world.rel_log_price[item]
        + world.user_buy[user]
        + _DEVICE_CONV[device]
        - (1.5 + 1.5 * c) * bait
    )
    mu = 2.8 + 0.3 * match + 0.25 * world.quality[item] + _DEVICE_DWELL[device] - (0.8 + 0.8 * c) * bait
    return _Logits(
        click=item_click[item] + context_click,
        conversion=z_conv,
        dwell_mu=mu,
        item_click=item_click,
        context_click_mean=float(context_click.mean()) if len(context_click) else 0.0,
    )


@dataclass(frozen=True)
class _Draws:
    """The label stream's uniforms and noise, drawn once so that a simulation can consume them in any order."""

    click: F64
    conversion: F64
    cart: F64
    dwell_noise: F64


def _label_draws(cfg: GeneratorConfig, n: int) -> _Draws:
    rng = _rng(cfg.seed, _STREAM_LABELS)
    click, conversion, cart = rng.random(n), rng.random(n), rng.random(n)
    return _Draws(click, conversion, cart, np.clip(rng.normal(0.0, 1.0, size=n), -_DWELL_TRUNC, _DWELL_TRUNC))


def _truth(
    cfg: GeneratorConfig,
    world: _World,
    imp: _Impressions,
    click_add: F64 | float = 0.0,
    conv_add: F64 | float = 0.0,
    intercepts: tuple[float, float] | None = None,
) -> _Truth:
    """The true per-impression probabilities (the oracle); ``*_add`` are the history terms (0 without repeat).

    The intercepts are solved for TARGET_CTR / TARGET_CVR unless given."""
    z = _logits(cfg, world, imp.user, imp.item, imp.slot, imp.hour, imp.device)
    z_click = z.click + click_add
    z_conv = z.conversion + conv_add
    if intercepts is None:
        b_click = _solve_intercept(z_click, TARGET_CTR)
        b_conv = _solve_intercept(z_conv, TARGET_CVR, weights=_sigmoid(z_click + b_click))  # a rate among clicks
    else:
        b_click, b_conv = intercepts
    p_click = _sigmoid(z_click + b_click)
    return _Truth(
        p_click=p_click,
        p_conversion=_sigmoid(z_conv + b_conv),
        conv_logit=z_conv + b_conv,
        dwell_log_mean=np.clip(z.dwell_mu, *_DWELL_MU_RANGE),
        item_click_base=_sigmoid(b_click + z.item_click + z.context_click_mean),
    )


def _draw_labels(truth: _Truth, draws: _Draws) -> tuple[Bool, Bool, Bool, F64]:
    """click, cart, conversion, dwell drawn from exactly the oracle's probabilities."""
    click = draws.click < truth.p_click
    conversion = click & (draws.conversion < truth.p_conversion)
    # Carted: always when purchased; otherwise more likely for items the user nearly bought.
    cart = conversion | (click & (draws.cart < _sigmoid(truth.conv_logit + 1.2)))
    dwell = np.where(click, np.expm1(truth.dwell_log_mean + _DWELL_SIGMA * draws.dwell_noise), 0.0)
    return click, cart, conversion, dwell


def _count_in(sorted_keys: I64, keys: I64) -> I64:
    return (np.searchsorted(sorted_keys, keys, side="right") - np.searchsorted(sorted_keys, keys, side="left")).astype(
        np.int64
    )


def _simulate_repeats(
    cfg: GeneratorConfig, world: _World, imp: _Impressions, draws: _Draws, b_click: float, b_conv: float
) -> tuple[I64, F64, F64]:
    """Hour by hour: re-shown items and the history terms of the logits (items, click_add, conv_add).

    Within an hour everything is vectorised; the state (the users' clicks and purchases so far) is updated at the
    end of each hour from the labels drawn with ``draws`` at intercepts ``b_click``, ``b_conv``.
    """
    rng = _rng(cfg.seed, _STREAM_REPEAT)
    n = len(imp.user)
    is_repeat = rng.random(n) < REPEAT_SHARE * cfg.repeat
    back = rng.geometric(_REPEAT_RECENCY, size=n).astype(np.int64) - 1  # 0 = the newest earlier click
    items = imp.item.copy()
    click_add, conv_add = np.zeros(n), np.zeros(n)
    n_items, n_cats = np.int64(cfg.num_items), np.int64(cfg.num_categories)
    clicked_user, clicked_item = np.zeros(0, np.int64), np.zeros(0, np.int64)  # in time order
    clicked_pairs, clicked_cats, bought_pairs = np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64)
    hours = cfg.num_days * 24
    bounds = np.searchsorted(imp.rel_ms, np.arange(hours + 1, dtype=np.int64) * MS_PER_HOUR)
    for h in range(hours):
        rows = np.arange(bounds[h], bounds[h + 1])
        if len(rows) == 0:
            continue
        user = imp.user[rows]
        # Re-shown items: the back-th newest of the user's earlier clicks (clamped to the oldest).
        by_user = np.argsort(clicked_user, kind="stable")  # stable: time order within a user
        users_sorted, items_sorted = clicked_user[by_user], clicked_item[by_user]
        first = np.searchsorted(users_sorted, user, side="left")
        last = np.searchsorted(users_sorted, user, side="right")
        take = is_repeat[rows] & (last > first)
        pick = last[take] - 1 - np.minimum(back[rows][take], last[take] - first[take] - 1)
        items[rows[take]] = items_sorted[pick]
        item = items[rows]

        pair = user * n_items + item
        before = np.isin(pair, clicked_pairs).astype(np.float64)
        rebuy = np.isin(pair, bought_pairs).astype(np.float64)
        in_category = _count_in(clicked_cats, user * n_cats + world.category[item]).astype(np.float64)
        click_add[rows] = cfg.repeat * (REPEAT_CLICK_ITEM * before + REPEAT_CLICK_CATEGORY * np.log1p(in_category))
        conv_add[rows] = cfg.repeat * (REPEAT_BUY_ITEM * before + REPEAT_REBUY * rebuy)

        z = _logits(cfg, world, user, item, imp.slot[rows], imp.hour[rows], imp.device[rows])
        click = draws.click[rows] < _sigmoid(z.click + click_add[rows] + b_click)
        bought = click & (draws.conversion[rows] < _sigmoid(z.conversion + conv_add[rows] + b_conv))

        clicked_user = np.concatenate([clicked_user, user[click]])
        clicked_item = np.concatenate([clicked_item, item[click]])
        clicked_pairs = np.concatenate([clicked_pairs, pair[click]])  # read by isin: any order
        clicked_cats = np.sort(np.concatenate([clicked_cats, (user * n_cats + world.category[item])[click]]))
        bought_pairs = np.concatenate([bought_pairs, pair[bought]])
    return items, click_add, conv_add


def _root(f: Callable[[float], float], lo: float, hi: float, tol: float = 2e-3) -> float:
    """A root of an increasing f in [lo, hi] by bisection (f is a simulation: noisy in its last digits, monotone
    overall, so no derivative-based step is safe)."""
    while hi - lo > tol:
        mid = 0.5 * (lo + hi)
        if f(mid) < 0:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def _with_repeats(cfg: GeneratorConfig, world: _World, imp: _Impressions, draws: _Draws) -> tuple[_Impressions, _Truth]:
    """The impressions with re-shown items and their truth.

    Clicks feed re-shown items, which draw more clicks, so the intercepts that give TARGET_CTR / TARGET_CVR are
    found by re-running the simulation: first the click intercept (clicks do not depend on purchases), then the
    purchase one. The last simulation's labels are the ones kept.
    """
    fresh = _logits(cfg, world, imp.user, imp.item, imp.slot, imp.hour, imp.device)
    b_click = _solve_intercept(fresh.click, TARGET_CTR)
    b_conv = _solve_intercept(fresh.conversion, TARGET_CVR, weights=_sigmoid(fresh.click + b_click))

    def rates(bc: float, bv: float) -> tuple[float, float]:
        items, click_add, conv_add = _simulate_repeats(cfg, world, imp, draws, bc, bv)
        z = _logits(cfg, world, imp.user, items, imp.slot, imp.hour, imp.device)
        p_click = _sigmoid(z.click + click_add + bc)
        p_conv = _sigmoid(z.conversion + conv_add + bv)
        return float(p_click.mean()), float((p_click * p_conv).sum() / p_click.sum())

    # The history terms only add to the logits: at the fresh intercepts the rates are at or above their targets.
    b_click = _root(lambda b: np.log(rates(b, b_conv)[0] / TARGET_CTR), b_click - 6.0, b_click)
    b_conv = _root(lambda b: np.log(rates(b_click, b)[1] / TARGET_CVR), b_conv - 6.0, b_conv + 2.0)
    items, click_add, conv_add = _simulate_repeats(cfg, world, imp, draws, b_click, b_conv)
    shown = replace(imp, item=items)
    return shown, _truth(cfg, world, shown, click_add, conv_add, intercepts=(b_click, b_conv))


def _item_ctr_7d(cfg: GeneratorConfig, world: _World, truth: _Truth, imp: _Impressions) -> F64:
    """A noisy, per-day estimate of each item's base click rate, as a feature store would compute it.

    Per (day, item): Binomial(n, base) over a pseudo 7-day impression count n that grows with popularity, shrunk
    towards TARGET_CTR. It uses the latent base rate, never the row's own label.
    """
    rng = _rng(cfg.seed, _STREAM_FEATURES)
    trials = np.maximum(np.round(world.popularity * 7 * cfg.impressions_per_day), 0).astype(np.int64)
    trials = np.broadcast_to(trials, (cfg.num_days, cfg.num_items))
    clicks = rng.binomial(trials, np.broadcast_to(truth.item_click_base, trials.shape))
    prior = 20.0
    est = (clicks + prior * TARGET_CTR) / (trials + prior)
    day = imp.rel_ms // MS_PER_DAY
    return est[day, imp.item]


def _counts_before(event_keys: I64, keys: I64, user_start_keys: I64) -> tuple[I64, I64]:
    """For each query: (end, count) of events of the same user with a strictly smaller key (ts ties excluded)."""
    end = np.searchsorted(event_keys, keys, side="left")
    start = np.searchsorted(event_keys, user_start_keys, side="left")
    return end.astype(np.int64), (end - start).astype(np.int64)


def _history(event: Bool, keys: I64, user_start_keys: I64, item: I64, cap: int) -> pa.ListArray:
    """list<int64> per row: the items of the user's earlier events (rows where ``event``), newest first, capped.

    Events are sorted by key = user * span + ts (stable, so same-ms events keep row order). For row r, ``end`` is the
    number of events with a smaller key, so events[end - 1], events[end - 2], ... are the user's latest earlier events
    as long as they stay at or after the user's first event.
    """
    ev_rows = np.flatnonzero(event)
    order = np.argsort(keys[ev_rows], kind="stable")
    ev_keys = keys[ev_rows][order]
    ev_items = item[ev_rows][order]
    end, count = _counts_before(ev_keys, keys, user_start_keys)
    length = np.minimum(count, cap)
    offsets = np.zeros(len(keys) + 1, dtype=np.int64)
    np.cumsum(length, out=offsets[1:])
    row = np.repeat(np.arange(len(keys), dtype=np.int64), length)
    back = np.arange(offsets[-1], dtype=np.int64) - offsets[row]  # 0 = newest
    values = ev_items[end[row] - 1 - back]
    # list<int64> has int32 offsets: fine below 2**31 sequence elements per generation run.
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(values, pa.int64()))


def clear_partitions(out_dir: Path) -> None:
    """Remove earlier dt=... folders so a re-run (another seed, fewer days) leaves no stale parts."""
    if out_dir.exists():
        for child in out_dir.iterdir():
            if child.is_dir() and child.name.startswith("dt="):
                shutil.rmtree(child)
    out_dir.mkdir(parents=True, exist_ok=True)


def generate_logs(cfg: GeneratorConfig, out_dir: Path, oracle_path: Path) -> GenerationResult:
    """Generate ``cfg.num_days * cfg.impressions_per_day`` impressions into ``out_dir`` and the oracle file.

    Deterministic in ``cfg``: the same config gives identical tables. Old ``dt=`` partitions in ``out_dir`` are
    removed first.
    """
    t0 = time.perf_counter()
    out_dir, oracle_path = Path(out_dir), Path(oracle_path)
    world = _build_world(cfg)
    imp = _sample_impressions(cfg, world)
    draws = _label_draws(cfg, len(imp.user))
    if cfg.repeat > 0:
        imp, truth = _with_repeats(cfg, world, imp, draws)
    else:
        truth = _truth(cfg, world, imp)
    click, cart, conversion, dwell = _draw_labels(truth, draws)
    n = len(imp.user)

    # One sortable key per (user, ts): the span exceeds every relative ts, so keys order by user, then time.
    span = cfg.num_days * MS_PER_DAY + 1
    keys = imp.user * span + imp.rel_ms
    user_start_keys = imp.user * span
    _, activity = _counts_before(np.sort(keys), keys, user_start_keys)  # impressions of the user before this one
    cap = cfg.max_seq_length
    start = dt.date.fromisoformat(cfg.start_date)
    epoch_ms = (start - dt.date(1970, 1, 1)).days * MS_PER_DAY
    request_id = np.arange(1, n + 1, dtype=np.int64)  # unique and increasing with time

    table = pa.Table.from_arrays(
        [
            pa.array(request_id),
            pa.array(epoch_ms + imp.rel_ms, pa.timestamp("ms")),
            pa.array(imp.user),
            pa.array(imp.item),
            pa.array(world.category[imp.item]),
            pa.array(world.seller[imp.item]),
            pa.array(imp.hour.astype(np.int32)),
            pa.DictionaryArray.from_arrays(pa.array(imp.device.astype(np.int32)), pa.array(DEVICES)).cast(pa.string()),
            pa.array(imp.slot.astype(np.int32)),
            pa.array(world.price[imp.item].astype(np.float32)),
            pa.array(_item_ctr_7d(cfg, world, truth, imp).astype(np.float32)),
            pa.array(activity.astype(np.float32)),
            _history(click, keys, user_start_keys, imp.item, cap),
            _history(cart, keys, user_start_keys, imp.item, cap),
            _history(conversion, keys, user_start_keys, imp.item, cap),
            _history(click, keys, user_start_keys, world.category[imp.item], cap),
            pa.array(click.astype(np.int8)),
            pa.array(conversion.astype(np.int8)),
            pa.array(dwell.astype(np.float32)),
        ],
        schema=LOG_SCHEMA,
    )

    clear_partitions(out_dir)
    files: list[Path] = []
    dates: list[str] = []
    day_bounds = np.searchsorted(imp.rel_ms, np.arange(cfg.num_days + 1, dtype=np.int64) * MS_PER_DAY)
    for d in range(cfg.num_days):
        date = (start + dt.timedelta(days=d)).isoformat()
        dates.append(date)
        part_dir = out_dir / f"dt={date}"
        part_dir.mkdir(parents=True)
        lo, hi = int(day_bounds[d]), int(day_bounds[d + 1])
        bounds = np.linspace(lo, hi, cfg.files_per_day + 1).astype(np.int64)
        for p in range(cfg.files_per_day):
            path = part_dir / f"part-{p:05d}.parquet"
            pq.write_table(table.slice(int(bounds[p]), int(bounds[p + 1] - bounds[p])), path)
            files.append(path)
        (part_dir / SUCCESS_MARKER).touch()  # last, as a log writer does: the partition is complete

    oracle = pa.Table.from_arrays(
        [
            pa.array(request_id),
            pa.array(truth.p_click),
            pa.array(truth.p_conversion),
            pa.array(truth.p_click * truth.p_conversion),
            pa.array(truth.dwell_log_mean),
        ],
        schema=ORACLE_SCHEMA,
    )
    oracle_path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(oracle, oracle_path)
    return GenerationResult(files=files, rows=n, dates=dates, oracle_path=oracle_path, seconds=time.perf_counter() - t0)
