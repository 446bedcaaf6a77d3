"""The prediction store: one group per subject with its virtual stain (docs/stores.md).

The root records the model (checksum), target and aggregation every subject was
made with; each subject's ``made_by`` records that plus the fingerprint of the
input subject it was predicted from. A subject is reused only when both match;
a store of another model is replaced only with ``overwrite`` (built aside,
swapped in when the run completes).
"""

from __future__ import annotations

import contextlib

import numpy as np

from mrhscale.errors import MRHError
from mrhscale.stores.base import aside, differences, fingerprint, recover, remove, swap_in
from mrhscale.stores.locks import Claim, run_token
from mrhscale.stores.subjects import GroupStore
from mrhscale.stores.urls import Location

FORMAT = "mrhscale-predictions"
IDENTITY = ("target", "variable", "aggregate", "model_sha256")


class PredictionStore(GroupStore):
    FORMAT = FORMAT

    def identity(self) -> dict:
        a = self.attrs
        return {k: a.get(k) if k != "model_sha256" else (a.get("model") or {}).get("sha256")
                for k in IDENTITY}

    def describe(self) -> str:
        a = self.attrs
        ids = self.subjects()
        model = a.get("model") or {}
        factor = ((model.get("uncertainty") or {}).get("calibration") or {}).get("factor")
        shown = ", ".join(f"{f:.4g}" for f in np.atleast_1d(factor)) if factor else ""
        unc = ([f"uncertainty: {a['uncertainty']} (ensemble of {model.get('members', '?')}; spread x "
                f"{shown}, calibrated at training)" if factor else f"uncertainty: {a['uncertainty']}"]
               if a.get("uncertainty") else [])
        return "\n".join([
            f"store: {self.name}", f"format: {FORMAT}",
            f"virtual stain: {a.get('variable')} (target {a.get('target')}, aggregate {a.get('aggregate')})",
            *unc,
            f"model: {model.get('path')} ({model.get('sha256', '?')[:19]})",
            f"subjects ({len(ids)}): {', '.join(ids) or 'none complete'}",
        ])


@contextlib.contextmanager
def output(loc: Location, identity: dict, root_attrs: dict, *, overwrite: bool = False):
    """The prediction store to write into for a run of one model.

    Same model, target and aggregation (or no store yet): the store itself. A store
    of another model: refused, or with ``overwrite`` a new store built aside and
    swapped in when the ``with`` block completes (a failure leaves the old one).
    """
    loc = Location.of(loc)
    store = PredictionStore(loc)
    exists = store.check_output()
    old = store.identity() if exists else identity
    if old == identity:
        store.prepare(root_attrs)
        yield store
        return
    if not overwrite:
        diff = "; ".join(differences(old, identity)[:3])
        raise MRHError(f"{store.name}: holds predictions of another model or setting ({diff}); "
                       "pass --overwrite to replace the store or choose another --out")
    with Claim(loc.claim_place(), f"prediction store {store.name}"):
        recover(loc)
        new = PredictionStore(aside(loc, "new", run_token()))
        new.prepare(root_attrs)
        try:
            yield new
        except BaseException:
            remove(new.loc)
            raise
        swap_in(new.loc, loc, token=run_token())


def stale_reason(store: PredictionStore, sid: str, made_by: dict) -> str | None:
    """Why a complete subject cannot be reused for ``made_by`` (None: reuse it)."""
    _, old = store.state(sid)
    if old is None:
        return "incomplete"

    if old.get("fingerprint") == fingerprint(made_by):
        return None
    return "; ".join(differences(old.get("made_by") or {}, made_by)[:3]) or "fingerprint differs"

