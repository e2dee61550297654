"""Inference: "what next for this history?" from a trained run.

:class:`Recommender` loads a run's checkpoint (safetensors, no pickles), computes the item
vectors once, and answers queries given as raw item ids (the ids of the original data), with
optional timestamps. Every query is validated by :meth:`Recommender.prepare`, which raises
:class:`RequestError` with a message naming the problem and the fix; valid queries are scored
together by :meth:`Recommender.score` (one forward pass for a whole batch). The CLI
(``fuxi-mme recommend``), the HTTP service and the exported model all use these.

Conventions:
* the history is oldest first; longer than ``max_len`` keeps the most recent ``max_len``;
* unknown item ids are reported back and ignored (``unknown_items="report"``, default), ignored
  silently (``"ignore"``) or rejected (``"reject"``);
* timestamps (unix seconds) are optional; when the model uses the temporal channel and none
  are given, all gaps are zero. ``now`` is the time of the next interaction (default: the last
  timestamp);
* already-seen items are excluded from the results when ``exclude_seen`` is true and kept when
  false; by default (None) the run's evaluation rule decides: excluded when its resolved
  ``eval.history`` is ``mask``, kept when ``keep`` (data with repeat consumption;
  docs/training.md#history-masking);
* behaviours (docs/serving.md#behaviours), for a model trained with ``model.use_behavior``:
  ``[[item, "cart"], ...]`` in the history or a parallel ``behaviors`` list; a model trained
  without them refuses them, and an unknown behaviour is an error listing the known ones.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data.batches import Batch
from ..data.table import MILLIS_ABOVE, millis_to_seconds
from ..eval.evaluator import encode_last
from ..utils.runtime import autocast_dtype

UNKNOWN_POLICIES = ("report", "ignore", "reject")


class RequestError(ValueError):
    """Bad input from a caller; ``status`` is the HTTP status the service answers with."""

    def __init__(self, message: str, status: int = 422):
        super().__init__(message)
        self.status = status


@dataclass
class Query:
    history: Sequence[Any]
    timestamps: Sequence[int] | None = None
    k: int = 10
    exclude_seen: bool | None = None  # None: as the run's resolved eval.history (mask -> true)
    unknown_items: str | None = None  # None: the recommender's default policy
    now: int | None = None
    behaviors: Sequence[str] | None = None  # one per history item (or pairs in the history)


@dataclass
class Prepared:
    ids: np.ndarray  # internal ids, most recent max_len
    ts: np.ndarray
    now: int
    seen: np.ndarray  # every known internal id of the history (for exclusion)
    k: int
    exclude_seen: bool
    unknown: list = field(default_factory=list)
    truncated: int = 0
    notes: list = field(default_factory=list)
    behaviors: np.ndarray | None = None  # behaviour codes aligned with ids (models with use_behavior)


def _py(v: Any) -> Any:
    return v.item() if isinstance(v, np.generic) else v


def _checked_timestamps(timestamps: Any, n: int) -> list | None:
    """A query's timestamps as a list (None without): one per history item, integer unix
    seconds >= 0, non-decreasing; otherwise a RequestError saying which one is wrong."""
    if timestamps is None:
        return None
    ts = list(timestamps)
    if len(ts) != n:
        raise RequestError(f"timestamps has {len(ts)} values but history has {n} items; give one timestamp per item or none")
    for i, t in enumerate(ts):
        if isinstance(t, bool) or not isinstance(t, (int, np.integer)) or t < 0:
            raise RequestError(f"timestamps[{i}] = {t!r} is not a unix time in seconds (an integer >= 0)")
    bad = next((i for i in range(1, len(ts)) if ts[i] < ts[i - 1]), None)
    if bad is not None:
        raise RequestError(
            f"timestamps must be non-decreasing (history oldest first), but timestamps[{bad}] = {ts[bad]} "
            f"< timestamps[{bad - 1}] = {ts[bad - 1]}; sort the history by time"
        )
    return ts


class Recommender:
    def __init__(self, cfg, ds, model, device: torch.device | str = "cpu", unknown_items: str = "report", run_dir: str | Path | None = None):
        if unknown_items not in UNKNOWN_POLICIES:
            raise ValueError(f"unknown_items={unknown_items!r}; use one of {', '.join(UNKNOWN_POLICIES)}")
        self.cfg, self.ds, self.model = cfg, ds, model
        self.device = torch.device(device)
        self.unknown_policy = unknown_items
        self.run_dir = str(run_dir) if run_dir else None
        self.max_len = cfg.data.max_len
        self.num_items = ds.num_items
        self.uses_time = bool(cfg.model.use_temporal and ds.has_timestamps)
        self.uses_behavior = bool(getattr(cfg.model, "use_behavior", False))
        self.behavior_names: list[str] = list(ds.behavior_names or []) if self.uses_behavior else []
        self.item_raw = ds.item_raw
        self.titles = ds.item_titles
        self._index = {str(k): i for i, k in enumerate(ds.item_raw.tolist()) if i > 0}
        self.amp = autocast_dtype(cfg.train.amp)  # the run's own evaluation precision
        from ..eval.evaluator import resolve_history

        self.history_mode = resolve_history(cfg.eval.history, ds, cfg.data.protocol)[0]
        if model is None:
            raise ValueError("this run is a popularity baseline: it has no model to serve")
        model.eval()
        with torch.no_grad(), torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None):
            self.items_ID = model.item_vectors().float()  # computed once

    @classmethod
    def from_run(cls, run_dir: str | Path, checkpoint: str = "auto", device: str = "cpu", unknown_items: str = "report") -> Recommender:
        from ..runs import load_trained
        from ..utils.runtime import resolve_device

        cfg, ds, model = load_trained(run_dir, checkpoint, device)
        return cls(cfg, ds, model, resolve_device(cfg.train.device), unknown_items, run_dir)

    # ------------------------------------------------------------------ metadata
    def info(self) -> dict[str, Any]:
        import json

        commit = None
        if self.run_dir and (Path(self.run_dir) / "run.json").is_file():
            commit = json.loads((Path(self.run_dir) / "run.json").read_text()).get("commit")
        return {
            "preset": self.cfg.preset,
            "model": self.cfg.model.name,
            "dataset": self.ds.name,
            "items": int(self.num_items),
            "max_len": int(self.max_len),
            "uses_timestamps": self.uses_time,
            "behaviors": self.behavior_names or None,
            "has_titles": self.titles is not None,
            "commit": commit,
            "run_dir": self.run_dir,
        }

    def title(self, internal: int) -> str | None:
        return self.titles[internal] if self.titles is not None else None

    def search(self, q: str, limit: int = 20) -> list[dict[str, Any]]:
        """Items whose title (or id) contains ``q``, case-insensitively (for the demo page)."""
        q = q.strip().lower()
        out = []
        for i in range(1, self.num_items + 1):
            raw = _py(self.item_raw[i])
            t = self.title(i) or ""
            if not q or q in t.lower() or q == str(raw).lower():
                out.append({"item": raw, "title": t or str(raw)})
                if len(out) >= limit:
                    break
        return out

    # ------------------------------------------------------------------ validation
    def prepare(self, q: Query) -> Prepared:
        k = q.k
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
            raise RequestError(f"k must be an integer; got {k!r}")
        if not 1 <= k <= self.num_items:
            raise RequestError(f"k must be between 1 and {self.num_items} (the catalogue size); got {k}")
        history = list(q.history) if q.history is not None else []
        if not history:
            raise RequestError("history is empty: give at least one item id (oldest first)")
        history, codes = self._behaviors(history, q.behaviors)
        ts = _checked_timestamps(q.timestamps, len(history))
        q_now = q.now
        millis = ts is not None and max(ts) > MILLIS_ABOVE
        if ts is not None and millis:  # the training data's readers' rule (data/table.millis_to_seconds)
            ts = [int(t) for t in millis_to_seconds(np.asarray(ts, dtype=np.int64))[0]]
            if isinstance(q_now, (int, np.integer)) and not isinstance(q_now, bool) and q_now > MILLIS_ABOVE:
                q_now = int(q_now) // 1000
        policy = q.unknown_items or self.unknown_policy
        if policy not in UNKNOWN_POLICIES:
            raise RequestError(f"unknown_items must be one of {', '.join(UNKNOWN_POLICIES)}; got {policy!r}")
        ids, kept_ts, unknown = self._known_items(history, ts, policy)
        notes = ["timestamps above 1e11 read as milliseconds and converted to seconds, as training data are"] if millis else []
        beh_a = None
        if self.uses_behavior:
            known = [j for j, raw in enumerate(history) if self._index.get(str(raw)) is not None]
            beh_a = np.asarray([codes[j] for j in known] if codes is not None else [0] * len(known), dtype=np.int64)[-self.max_len :]
            if codes is None:
                notes.append(f"no behaviours given: the model sees none (it was trained with {', '.join(self.behavior_names)})")
        if ts is None and self.uses_time:
            notes.append("no timestamps given: the temporal channel sees zero gaps")
        if ts is not None and not self.uses_time:
            notes.append("this model has no temporal channel: timestamps were ignored")
        now = kept_ts[-1]
        if q_now is not None:
            if isinstance(q_now, bool) or not isinstance(q_now, (int, np.integer)) or q_now < kept_ts[-1]:
                raise RequestError(f"now = {q_now!r} must be an integer unix time >= the last timestamp ({kept_ts[-1]})")
            now = int(q_now)
        seen = np.unique(np.asarray(ids, dtype=np.int64))
        truncated = max(0, len(ids) - self.max_len)
        ids_a = np.asarray(ids[-self.max_len :], dtype=np.int64)
        ts_a = np.asarray(kept_ts[-self.max_len :], dtype=np.int64)
        if not self.uses_time:
            ts_a = np.zeros_like(ts_a)
            now = 0
        if truncated:
            notes.append(f"history longer than max_len={self.max_len}: the {truncated} oldest item(s) were dropped")
        return Prepared(
            ids_a,
            ts_a,
            now,
            seen,
            int(k),
            bool(self.history_mode == "mask" if q.exclude_seen is None else q.exclude_seen),
            unknown if policy == "report" else [],
            truncated,
            notes,
            beh_a,
        )

    def _behaviors(self, history: list, behaviors: Sequence[str] | None) -> tuple[list, list[int] | None]:
        """The history's item ids and, when behaviours are given (pairs or a parallel list),
        their codes; RequestError for behaviours a model trained without them cannot read,
        unknown ones, or a list of the wrong length."""
        pairs = [isinstance(h, (list, tuple)) for h in history]
        if any(pairs):
            if not all(pairs) or any(len(h) != 2 for h in history) or behaviors is not None:
                raise RequestError('history mixes plain ids and [item, behaviour] pairs; give every item as [item, "behaviour"], or plain ids')
            behaviors = [h[1] for h in history]
            history = [h[0] for h in history]
        if behaviors is None:
            return history, None
        if not self.uses_behavior:
            raise RequestError("this model was trained without behaviours (model.use_behavior=false): send plain item ids, without behaviours")
        behaviors = list(behaviors)
        if len(behaviors) != len(history):
            raise RequestError(f"behaviors has {len(behaviors)} values but history has {len(history)} items; give one behaviour per item")
        codes = []
        for j, b in enumerate(behaviors):
            if not isinstance(b, str) or b not in self.behavior_names:
                raise RequestError(f"behaviour {b!r} of history[{j}] is not one this model knows; known: {', '.join(self.behavior_names)}")
            codes.append(self.behavior_names.index(b) + 1)
        return history, codes

    def _known_items(self, history: list, ts: list[int] | None, policy: str) -> tuple[list[int], list[int], list]:
        """The history's catalogue indices and their timestamps (0 without), and the ids not in
        the catalogue; raises under ``reject`` with unknown ids, or when no id is known."""
        ids: list[int] = []
        kept_ts: list[int] = []
        unknown: list = []
        for j, raw in enumerate(history):
            if isinstance(raw, (dict, list, bool)) or raw is None:
                raise RequestError(f"history[{j}] = {raw!r} is not an item id (a string or an integer)")
            i = self._index.get(str(raw))
            if i is None:
                unknown.append(raw)
                continue
            ids.append(i)
            kept_ts.append(int(ts[j]) if ts is not None else 0)
        if unknown and policy == "reject":
            shown = ", ".join(map(repr, unknown[:10])) + (" ..." if len(unknown) > 10 else "")
            raise RequestError(
                f"{len(unknown)} item id(s) are not in the model's catalogue: {shown}; remove them, or ignore unknown items "
                "(--unknown-items ignore on the command line, unknown_items='ignore' in Python)"
            )
        if not ids:
            raise RequestError(
                f"none of the history's {len(history)} item id(s) is in the model's catalogue (e.g. {history[0]!r}); "
                "check the ids (raw ids of the training data)"
            )
        return ids, kept_ts, unknown

    # ------------------------------------------------------------------ scoring
    def batch_tensors(self, preps: list[Prepared]) -> Batch:
        """The prepared queries as one :class:`~fuxi_mme.data.batches.Batch` (no targets)."""
        n = max(len(p.ids) for p in preps)
        B = len(preps)
        ids = np.zeros((B, n), dtype=np.int64)
        ts = np.zeros((B, n), dtype=np.int64)
        qts = np.zeros((B, n), dtype=np.int64)
        lengths = np.zeros(B, dtype=np.int64)
        beh = np.zeros((B, n), dtype=np.int64) if self.uses_behavior else None
        for r, p in enumerate(preps):
            L = len(p.ids)
            ids[r, :L], ts[r, :L], lengths[r] = p.ids, p.ts, L
            if beh is not None and p.behaviors is not None:
                beh[r, :L] = p.behaviors
            qts[r, : L - 1] = p.ts[1:]
            qts[r, L - 1] = p.now
        put = lambda a: torch.from_numpy(a).to(self.device)  # noqa: E731
        return Batch(
            ids=put(ids),
            ts=put(ts),
            query_ts=put(qts),
            lengths=put(lengths),
            targets=put(np.zeros_like(ids)),
            behaviors=put(beh) if beh is not None else None,
        )

    @torch.no_grad()
    def score(self, preps: list[Prepared]) -> list[dict[str, Any]]:
        if not preps:
            return []
        batch = self.batch_tensors(preps)
        scores = encode_last(self.model, batch, self.amp) @ self.items_ID.T  # (B, I+1)
        scores[:, 0] = -torch.inf
        rows = [np.full(len(p.seen), r) for r, p in enumerate(preps) if p.exclude_seen]
        if rows:
            cols = np.concatenate([p.seen for p in preps if p.exclude_seen])
            scores[torch.from_numpy(np.concatenate(rows)).to(scores.device), torch.from_numpy(cols).to(scores.device)] = -torch.inf
        kmax = max(p.k for p in preps)
        val, idx = scores.topk(kmax, dim=1)
        val, idx = val.cpu().numpy(), idx.cpu().numpy()
        out = []
        for r, p in enumerate(preps):
            items = []
            for v, i in zip(val[r, : p.k], idx[r, : p.k]):
                if not np.isfinite(v):
                    break  # fewer candidates than k once seen items are excluded
                rec = {"item": _py(self.item_raw[i]), "score": float(v)}
                if self.titles is not None:
                    rec["title"] = self.titles[i]
                items.append(rec)
            res: dict[str, Any] = {"items": items}
            if p.unknown:
                res["unknown_items"] = [_py(u) for u in p.unknown]
            if p.truncated:
                res["truncated"] = p.truncated
            notes = p.notes + ([self._short_note(len(items))] if len(items) < p.k and p.exclude_seen else [])
            if notes:
                res["notes"] = notes
            out.append(res)
        return out

    def _short_note(self, n: int) -> str:
        """Why a query got fewer than k items: the rest of the catalogue is in its history."""
        why = "every item of the catalogue is" if n == 0 else f"all but {n} of the {self.num_items} items of the catalogue are"
        return f"{why} in the history and exclude_seen is on: pass exclude_seen=false (CLI: --include-seen) to rank the seen ones too"

    def recommend(self, queries: list[Query]) -> list[dict[str, Any]]:
        """Validate then score; the first invalid query raises RequestError."""
        return self.score([self.prepare(q) for q in queries])

    def history_of(self, raw_user: Any) -> Query:
        """The full history of a user of the training data (all splits)."""
        users = {str(u): i for i, u in enumerate(self.ds.user_raw.tolist())}
        u = users.get(str(raw_user))
        if u is None:
            raise RequestError(f"user {raw_user!r} is not in dataset {self.ds.name}")
        items, ts = self.ds.sequence(u)
        behaviors = None
        if self.uses_behavior and self.ds.behaviors is not None:
            s, e = self.ds.offsets[u], self.ds.offsets[u + 1]
            behaviors = [self.behavior_names[c - 1] for c in self.ds.behaviors[s:e].tolist()]
        return Query([_py(self.item_raw[i]) for i in items], [int(t) for t in ts] if self.ds.has_timestamps else None, behaviors=behaviors)
