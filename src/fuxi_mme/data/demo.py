"""The built-in ``demo`` dataset: a deterministic synthetic interaction log.

It is made so that everything a sequential recommender is supposed to exploit carries signal,
and a model that ignores any one of them leaves accuracy on the table:

* **Item facets.** Each item has three independent latent attributes: a genre (8), a style
  (4) and a position inside a short *series* (items of one series are meant to be consumed in
  order). Users have a stable style preference and a drifting set of genre interests, so the
  facets are learnable separately (the multi-embedding hypothesis of Fuxi-MME).
* **Order.** Inside a session a user walks through a series in order, then moves to another
  series of the same genre: the next item depends on the last few items, not only on the user.
* **Time gaps.** Sessions are separated by gaps. After a short gap (< 1 day) the user goes on
  with the current genre; after a long gap (days to weeks) the user returns to an *older*
  interest. The gap to the next item is visible to the temporal channel at query time (the
  target's timestamp, never its id), so the temporal channel can tell the two cases apart.
* **Popularity.** Series have Zipf-like popularity, so the popularity baseline is not trivial.
* **Behaviours** (``data.behavior=auto``; docs/datasets.md#behaviours). Each event is a
  ``view``, a ``save`` or a ``purchase``, drawn from their own random stream after the log is
  made, so the items and times are those of the log without behaviours. A ``save`` says the
  next event goes on with the same series (80% of series continuations are saves, 2% of the
  other events): a model that reads behaviours knows when a series goes on. A ``purchase``
  falls mostly on items of the user's most frequent style (25% of those events, 3% of the
  rest; never on a save), so "what will this user buy next" (``data.target_behavior=purchase``) differs from
  "what will this user watch next".

Defaults: 3,000 users, 640 items, about 150k interactions; generation takes well under a
second and is bit-for-bit reproducible for a given ``(num_users, seed)``.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

DEMO_VERSION = 2
BEHAVIOR_VERSION = 1  # the behaviour column's generator (part of the cache key only with behaviours)
BEHAVIORS = ("view", "save", "purchase")
NUM_GENRES = 8
NUM_STYLES = 4
SERIES_PER_CELL = 5
SERIES_LEN = 4
NUM_ITEMS = NUM_GENRES * NUM_STYLES * SERIES_PER_CELL * SERIES_LEN  # 640
P_CONTINUE_SERIES = 0.45  # next step follows the current series
P_PREFERRED_STYLE = 0.7


def item_catalogue() -> pd.DataFrame:
    """Item id (1-based raw id), genre, style, series id and position in the series."""
    ids = np.arange(NUM_ITEMS)
    pos = ids % SERIES_LEN
    series = ids // SERIES_LEN
    cell = series // SERIES_PER_CELL
    genre = cell // NUM_STYLES
    style = cell % NUM_STYLES
    titles = [f"G{g}-S{s}-series{sr % SERIES_PER_CELL}-part{p + 1}" for g, s, sr, p in zip(genre, style, series, pos)]
    return pd.DataFrame({"item": ids + 1, "genre": genre, "style": style, "series": series, "part": pos, "title": titles})


def generate(num_users: int = 3000, seed: int = 0) -> pd.DataFrame:
    """Return the canonical table (user, item, timestamp) of the demo dataset."""
    rng = np.random.default_rng(seed)
    cat = item_catalogue()
    genre_of, style_of = cat["genre"].to_numpy(), cat["style"].to_numpy()
    # Zipf-like item popularity, shuffled so that it is independent of the facets.
    pop = 1.0 / np.arange(1, NUM_ITEMS + 1) ** 0.9
    pop = pop[rng.permutation(NUM_ITEMS)]
    cell_items = {(g, s): np.flatnonzero((genre_of == g) & (style_of == s)) for g in range(NUM_GENRES) for s in range(NUM_STYLES)}
    cell_p = {k: pop[v] / pop[v].sum() for k, v in cell_items.items()}

    users, items, times = [], [], []
    t0 = 1_600_000_000
    for u in range(num_users):
        style_pref = int(rng.integers(NUM_STYLES))
        interests = [int(g) for g in rng.choice(NUM_GENRES, size=3, replace=False)]
        history_genres: list[int] = []
        length = int(np.clip(rng.lognormal(mean=3.8, sigma=0.45), 12, 150))
        t = t0 + int(rng.integers(0, 86400 * 365))
        genre = interests[0]
        cur = -1  # current item (0-based)
        n = 0
        while n < length:
            # ---- session boundary: the gap decides what comes next
            if n > 0:
                if rng.random() < 0.55:
                    t += int(rng.integers(1800, 6 * 3600))  # short break: the genre goes on
                else:
                    t += int(rng.integers(3 * 86400, 40 * 86400))  # long break: back to an older interest
                    older = [g for g in history_genres[-6:] if g != genre] or [g for g in interests if g != genre]
                    genre = int(older[rng.integers(len(older))])
                    cur = -1
                    if rng.random() < 0.15:  # interests drift
                        interests[int(rng.integers(3))] = int(rng.integers(NUM_GENRES))
            history_genres.append(genre)
            for _ in range(int(rng.integers(3, 9))):
                if n >= length:
                    break
                in_series = cur >= 0 and cur % SERIES_LEN < SERIES_LEN - 1
                if in_series and rng.random() < P_CONTINUE_SERIES:
                    cur += 1
                else:
                    style = style_pref if rng.random() < P_PREFERRED_STYLE else int(rng.integers(NUM_STYLES))
                    cur = int(rng.choice(cell_items[(genre, style)], p=cell_p[(genre, style)]))
                users.append(u + 1)
                items.append(cur + 1)
                times.append(t)
                t += int(rng.integers(60, 900))
                n += 1
    df = pd.DataFrame(
        {
            "user": np.asarray(users, dtype=np.int64),
            "item": np.asarray(items, dtype=np.int64),
            "timestamp": np.asarray(times, dtype=np.int64),
        }
    )
    df["behavior"] = behaviors(df, cat, seed)
    return df


def behaviors(df: pd.DataFrame, cat: pd.DataFrame, seed: int) -> np.ndarray:
    """The behaviour of each event of the log (strings of :data:`BEHAVIORS`), from a random
    stream of its own: see the module docstring for the signal each one carries."""
    rng = np.random.default_rng([seed, 1])
    user, item = df["user"].to_numpy(), df["item"].to_numpy() - 1
    series_of, style = cat["series"].to_numpy(), cat["style"].to_numpy()[item]
    same_user_next = np.append(user[1:] == user[:-1], False)
    nxt = np.append(item[1:], 0)
    continues = same_user_next & (nxt == item + 1) & (series_of[nxt] == series_of[item])  # the next part of the series
    codes = pd.factorize(pd.Series(user))[0]
    counts = np.zeros((codes.max() + 1, NUM_STYLES), dtype=np.int64)
    np.add.at(counts, (codes, style), 1)
    favourite = counts.argmax(1)[codes] == style
    u1, u2 = rng.random(len(df)), rng.random(len(df))
    out = np.where(u1 < np.where(continues, 0.8, 0.02), "save", "view").astype(object)
    out[(out == "view") & (u2 < np.where(favourite, 0.25, 0.03))] = "purchase"
    return out
