"""The ``ingest`` stage for ``source: alerce``: an incremental, idempotent nightly pull into the raw store.

Per class, /objects is listed from that class's watermark (minus an overlap) in lastmjd order; objects never fetched,
or whose lastmjd moved since they were, get their light curves fetched (bounded concurrency, rate limited, retried);
the rest are skipped, and so are objects that failed for good (a 404, no detections) until their lastmjd moves
(the ``unavailable`` state). Fetched rows are upserted by (oid, mjd, band) and committed every ``commit_every`` objects,
each commit atomic, with the per-object ``seen`` state; the watermarks advance only in the final commit, and only
past what was listed without a gap (in an order checked, not trusted) and fetched without a transient failure.
A pull killed at any point therefore leaves the last commit intact, and a rerun lists the same objects, skips what
was committed and finishes the job.

A pull is ``complete`` when every listing was read to its end and no object failed for a transient reason;
otherwise the manifest's ``missing`` names each failed page, object or cap (and, for a listing stopped by a run of
failed pages, the rest of that class), and a rerun picks them up. A server
that cannot be reached, or that refuses every class's first page, fails the pull before anything is committed.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd

from deeprubin.config import BaseParams, IngestParams
from deeprubin.schema import LightCurves, Rejection, ValidationReport
from deeprubin.sources.alerce import (
    ApiRefused,
    Caller,
    Failure,
    Listing,
    RateLimiter,
    ThreadLocalClients,
    fetch_in_chunks,
    light_curve_tables,
    list_class,
)
from deeprubin.progress import Progress, silent
from deeprubin.sources.batch import IngestResult, prepare_batch
from deeprubin.store import RawStore, UpsertCounts, upsert

STATE_VERSION = 1


def _per_class_detections(lcs: LightCurves) -> dict[str, int]:
    if lcs.detections.empty:
        return {}
    label_of = lcs.objects.set_index("oid")["label"]
    return lcs.detections["oid"].map(label_of).fillna("(none)").value_counts().to_dict()


def _is_new(seen: dict[str, float], oid: str, lastmjd: float, unavailable: dict[str, float] | None = None) -> bool:
    """Never fetched (nor failed for good), or its lastmjd moved since (a NaN lastmjd always counts as new)."""
    return not (seen.get(oid, -math.inf) >= lastmjd - 1e-9
                or (unavailable or {}).get(oid, -math.inf) >= lastmjd - 1e-9)


def _needs_fetch(listing: Listing, seen: dict[str, float], unavailable: dict[str, float] | None = None
                 ) -> pd.DataFrame:
    rows = listing.rows
    new = [_is_new(seen, oid, lastmjd, unavailable)
           for oid, lastmjd in zip(rows["oid"], rows["lastmjd"].astype(float))]
    return rows.loc[new]


def _new_watermark(old: float | None, listing: Listing, failed: list[Failure], lastmjd_of: dict[str, float]
                   ) -> float | None:
    """Advance past what is safely stored: no further than the listing proved gap-free (a failed page holds it,
    whatever was listed after), and back to the first object that failed for a transient reason."""
    if listing.rows.empty:
        return old
    held = [lastmjd_of[f.what] for f in failed if f.transient and f.what in lastmjd_of
            and not math.isnan(lastmjd_of[f.what])]
    safe = listing.safe_lastmjd
    proven = [w for w in (old, safe) if w is not None]
    if not proven:
        return None  # nothing proven stored yet: a failed object cannot set a watermark either
    return min([max(proven), *held])


def _missing(listings: dict[str, Listing], fetch_failures: list[Failure], class_of: dict[str, str]
             ) -> list[dict[str, Any]]:
    """What this pull should have stored and did not, for reasons a rerun can fix: failed listing pages, a listing
    cut short (cap, too many pages), objects whose fetch failed for a transient reason."""
    out: list[dict[str, Any]] = []
    for class_name, lst in listings.items():
        out += [{"class": class_name, **f.as_dict()} for f in lst.failures]
        if lst.capped:
            out.append({"class": class_name, "what": f"objects of {class_name} past the cap",
                        "reason": "max_objects_per_class reached; the next pull continues", "attempts": 0,
                        "transient": True})
    out += [{"class": class_of.get(f.what, "(unknown)"), **f.as_dict()} for f in fetch_failures if f.transient]
    return out


def pull(params: IngestParams, raw_dir: Path, base: BaseParams, step: Progress) -> IngestResult:
    ap = params.alerce
    store = RawStore(raw_dir)
    current = store.read()
    state = store.read_state()
    watermarks: dict[str, float | None] = dict(state.get("watermarks", {}))
    seen: dict[str, float] = dict(state.get("seen", {}))
    # Objects that failed for good (404, no detections, unusable), by the lastmjd they had: not asked again until
    # their lastmjd moves.
    unavailable: dict[str, float] = dict(state.get("unavailable", {}))
    started_at = pd.Timestamp.now(tz="UTC")
    before_objects = set(current.objects["oid"])
    before_detections = _per_class_detections(current)

    call = Caller(ap, RateLimiter(ap.requests_per_second))
    clients = ThreadLocalClients(ap)
    listings: dict[str, Listing] = {}
    for class_name in base.classes:
        step(f"listing {class_name} (p >= {ap.threshold(class_name)})")
        old = watermarks.get(class_name)
        lower = old - ap.overlap_days if old is not None else ap.since_mjd
        listings[class_name] = list_class(clients.get(), call, ap, class_name, lower,
                                          is_new=lambda oid, lastmjd: _is_new(seen, oid, lastmjd, unavailable))
    refused = [lst.refused for lst in listings.values()]
    if all(refused):
        raise ApiRefused(f"the ALeRCE API at {ap.base_url} refused the first page of every class "
                         f"({refused[0].what}: {refused[0].reason}); check ingest.alerce.base_url")

    listed = pd.concat([lst.rows for lst in listings.values()], ignore_index=True).drop_duplicates("oid", keep="last")
    lastmjd_of = dict(zip(listed["oid"], listed["lastmjd"].astype(float)))
    labels = pd.DataFrame({"oid": listed["oid"], "label": listed["class"],
                           "label_probability": listed["probability"].astype(float)})
    todo = pd.concat([_needs_fetch(lst, seen, unavailable) for lst in listings.values()], ignore_index=True)
    todo = todo.drop_duplicates("oid", keep="last")
    class_of = dict(zip(listed["oid"], listed["class"]))

    reports = [ValidationReport("detections"), ValidationReport("non_detections")]
    dropped: list[Rejection] = []
    fetch_failures: list[Failure] = []
    fetched_ok: list[str] = []
    counts: UpsertCounts | None = None

    def result(complete: bool) -> IngestResult:
        failures_by_class: dict[str, list[dict]] = {c: [] for c in base.classes}
        for class_name, lst in listings.items():
            failures_by_class[class_name] += [f.as_dict() for f in lst.failures]
        for f in fetch_failures:
            failures_by_class.setdefault(class_of.get(f.what, "(unknown)"), []).append(f.as_dict())
        after_detections = _per_class_detections(current)
        per_class: dict[str, dict[str, Any]] = {}
        for class_name, lst in listings.items():
            oids = set(lst.rows["oid"])
            ok = [o for o in fetched_ok if o in oids]
            per_class[class_name] = {
                "threshold": ap.threshold(class_name),
                "listed": len(lst.rows),
                "skipped_unchanged": int(len(lst.rows) - todo["oid"].isin(oids).sum()) - n_unavailable[class_name],
                "skipped_unavailable": n_unavailable[class_name],
                "fetched": len(ok),
                "objects_new": sum(o not in before_objects and o in stored for o in ok),
                "objects_updated": sum(o in before_objects for o in ok),
                "detections_added": int(after_detections.get(class_name, 0) - before_detections.get(class_name, 0)),
                "watermark_before": watermarks.get(class_name),
                "watermark_after": new_watermarks.get(class_name, watermarks.get(class_name)),
                "listing_complete": lst.complete,
                "listing_ordered": lst.ordered,
                "failures": failures_by_class.get(class_name, []),
            }
        stored_counts = current.objects["label"].fillna("(none)").value_counts().sort_index()
        return IngestResult(
            source="alerce", raw_dir=raw_dir,
            objects_per_class={str(k): int(v) for k, v in stored_counts.items()},
            detections=len(current.detections), non_detections=len(current.non_detections),
            reports=reports, objects_dropped=dropped, counts=counts, per_class=per_class, complete=complete,
            missing=_missing(listings, fetch_failures, class_of),
            extra={"base_url": ap.base_url, "started_at": str(started_at), "requests": call.requests_made,
                   "retries": call.retries},
        )

    n_unavailable = {c: sum(_is_new(seen, o, m) and not _is_new({}, o, m, unavailable)
                            for o, m in zip(lst.rows["oid"], lst.rows["lastmjd"].astype(float)))
                     for c, lst in listings.items()}
    new_watermarks: dict[str, float | None] = {}
    stored: set[str] = before_objects
    oids = list(todo["oid"])
    for fetched, failed in fetch_in_chunks(clients, call, oids, ap.concurrency, ap.commit_every, step):
        fetch_failures += failed
        unavailable.update({f.what: lastmjd_of.get(f.what, math.nan) for f in failed if not f.transient})
        mapped = light_curve_tables(fetched, labels, "alerce", f"alerce:{ap.classifier}")
        batch, chunk_reports, chunk_dropped = prepare_batch(mapped, params, base, pd.Timestamp.now(tz="UTC"),
                                                            silent)
        current, chunk_counts = upsert(current, batch)
        counts = chunk_counts if counts is None else counts + chunk_counts
        reports = [r.merge(c) for r, c in zip(reports, chunk_reports)]
        dropped += chunk_dropped
        stored = set(current.objects["oid"])
        for f in fetched:
            seen[f.oid] = lastmjd_of.get(f.oid, math.nan)
            unavailable.pop(f.oid, None)
            fetched_ok.append(f.oid)
        interim = result(complete=False)
        store.commit(current, interim.manifest(), rejections=interim.rejections_frame(),
                     state={**state, "version": STATE_VERSION, "watermarks": watermarks, "seen": seen,
                            "unavailable": unavailable})

    for class_name, lst in listings.items():
        failed = [f for f in fetch_failures if class_of.get(f.what) == class_name]
        new_watermarks[class_name] = _new_watermark(watermarks.get(class_name), lst, failed, lastmjd_of)
    final = result(complete=not _missing(listings, fetch_failures, class_of))
    step(f"writing {raw_dir}")
    store.commit(current, final.manifest(), rejections=final.rejections_frame(),
                 state={**state, "version": STATE_VERSION, "watermarks": {**watermarks, **new_watermarks},
                        "seen": seen, "unavailable": unavailable})
    return final
