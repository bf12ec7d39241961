"""The BTS source: spectroscopic types from the ZTF Bright Transient Survey, light curves from ALeRCE.

The BTS sample explorer (``ingest.bts.url``, by default https://sites.astro.caltech.edu/ztf/bts/explorer.php) exports
its catalogue as CSV (``f=s&format=csv`` plus the sample cuts in ``ingest.bts.query``; the exact query string is
configuration, since the explorer's parameters are not a documented API). Its columns include ``ZTFID, IAUID, RA,
Dec, peakt, peakfilt, peakmag, peakabs, duration, rise, fade, type, redshift, b, A_V``; ``type`` is the
spectroscopic classification, ``-`` while untyped. Only ``ZTFID`` and ``type`` are required here.

A pull downloads the whole catalogue (one request, retried on 5xx, 429, timeouts and truncated bodies by the ALeRCE
source's :class:`~deeprubin.sources.alerce.Caller`), keeps the typed entries that are new or re-typed since the last
pull (the catalogue has no modification time per row, so the watermark is the last stored type per ZTFID, kept in
the raw store's state), maps each type onto a label (:func:`map_type`: the SN Ia family -> SNIa; SN II, IIP, II-pec
-> SNII; other types keep a group name of their own, outside the four classes, and the exact type stays in the
state) and fetches each object's light curve from the ALeRCE API (``ingest.alerce``: rate limit, retries,
concurrency) with the ALeRCE source's fetch machinery. Labels carry ``label_source = bts:spectroscopic``; the store
keeps a spectroscopic label when a classifier labels the object again (:func:`deeprubin.store.upsert`).

Like the ALeRCE pull it commits every ``ingest.alerce.commit_every`` objects (atomically, with the state), so a pull
killed midway loses nothing that was committed and a rerun finishes the job; rows are upserted by key, so a rerun
never duplicates. An object whose light curve failed for good (404, no detections) is not asked again until its
type changes; one that failed for a transient reason is ``missing`` and the next pull retries it.
"""

from __future__ import annotations

import csv
import io
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pandas as pd
import requests

from deeprubin.config import BaseParams, BtsParams, IngestParams
from deeprubin.progress import Progress, silent
from deeprubin.schema import SPECTROSCOPIC, Rejection, ValidationReport
from deeprubin.sources.alerce import Caller, Failure, RateLimiter, RequestFailed, ThreadLocalClients, \
    fetch_in_chunks, light_curve_tables
from deeprubin.sources.batch import IngestResult, prepare_batch
from deeprubin.store import RawStore, UpsertCounts, upsert

STATE_KEY = "bts"
STATE_VERSION = 1
BTS_COLUMNS: tuple[str, ...] = ("ZTFID", "IAUID", "RA", "Dec", "peakt", "peakfilt", "peakmag", "peakabs", "duration",
                                "rise", "fade", "type", "redshift", "b", "A_V")
REQUIRED_COLUMNS: tuple[str, ...] = ("ZTFID", "type")
UNTYPED: frozenset[str] = frozenset({"", "-", "--", "?", "nan", "none", "null", "unknown"})
ZTF_OID = re.compile(r"^ZTF\d{2}[a-z]{7}$")
# Groups outside the four classes (data/bts/README.md): stored with the object, never trained or scored on.
OTHER_GROUPS: tuple[str, ...] = ("SNIbc", "SNIIn", "SNIIb", "SLSN", "other")
_SNII = frozenset({"ii", "iip", "ii-p", "ii-pec"})


class BtsFormatError(ValueError):
    """The catalogue download is not a BTS CSV export (an HTML page, no ZTFID/type columns)."""


class CatalogueUnavailable(ConnectionError):
    """The catalogue download failed after its retries (server errors, timeouts, truncated bodies): try later."""


class CatalogueRefused(ValueError):
    """The explorer answered the download with a client error (4xx): a wrong URL or query."""


class TruncatedBody(Exception):
    """The body ended inside a row: retried by the Caller (``retry_reason``)."""

    retry_reason = "truncated CSV body"


def _core(bts_type: str) -> str:
    """'SN Ia-91T' / 'Ia-91T' / 'SNIa-91T' -> 'ia-91t' (spaces collapsed, the 'SN' prefix dropped, lower case)."""
    text = re.sub(r"\s+", " ", bts_type.strip())
    text = re.sub(r"^SN\s*(?=I)", "", text, flags=re.IGNORECASE)
    return text.lower()


def map_type(bts_type: object) -> str | None:
    """A BTS spectroscopic type -> the project's label: ``SNIa`` (the SN Ia family: Ia, Ia-91T, Ia-91bg, Ia-pec,
    Iax, Ia-CSM, ...), ``SNII`` (II, IIP, II-pec), or a group outside the four classes (``SNIbc``, ``SNIIn``,
    ``SNIIb``, ``SLSN``, ``other``); None for an untyped entry (``-``). Accepts the spellings with and without the
    ``SN`` prefix. An uncertain type (ending in ``?``) is ``other``: a guess is not a spectroscopic label."""
    if bts_type is None or (isinstance(bts_type, float) and math.isnan(bts_type)):
        return None
    text = str(bts_type).strip()
    if text.lower() in UNTYPED:
        return None
    if text.endswith("?"):
        return "other"
    core = _core(text)
    if core.startswith("slsn"):
        return "SLSN"
    if core.startswith("ia"):
        return "SNIa"
    if core in _SNII:
        return "SNII"
    if core.startswith("iin"):
        return "SNIIn"
    if core.startswith("iib"):
        return "SNIIb"
    if core.startswith(("ib", "ic")):
        return "SNIbc"
    return "other"


@dataclass
class BtsCatalogue:
    """The typed entries of one download (oid, bts_type, label, and the other columns as given), and what was
    left out."""

    rows: pd.DataFrame
    rows_in: int
    untyped: int
    dropped: list[Rejection] = field(default_factory=list)


def parse_catalogue(text: str) -> BtsCatalogue:
    """Parse the explorer's CSV export. Raises :class:`TruncatedBody` when the last row is cut short (retry) and
    :class:`BtsFormatError` when it is not a catalogue at all; a bad row (wrong field count, not a ZTF object id,
    a second row for the same object) is dropped with a reason naming it."""
    text = text.lstrip("\ufeff")
    head = text.lstrip()[:200].lower()
    if head.startswith("<") or "<html" in head:
        raise BtsFormatError(f"the BTS download is an HTML page, not the CSV export: {text.strip()[:80]!r}")
    records = list(csv.reader(io.StringIO(text)))
    records = [r for r in records if any(c.strip() for c in r)]
    if not records:
        raise BtsFormatError("the BTS download is empty (no header row)")
    header = [c.strip() for c in records[0]]
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    if missing:
        raise BtsFormatError(f"the BTS download has no {missing} column(s): got {header[:20]}; "
                             "check ingest.bts.url and ingest.bts.query")
    width = len(header)
    i_oid, i_type = header.index("ZTFID"), header.index("type")
    if len(records) > 1 and len(records[-1]) < width and not text.endswith(("\n", "\r")):
        raise TruncatedBody(f"the last row has {len(records[-1])} of {width} fields")
    dropped: list[Rejection] = []
    good: list[list[str]] = []
    for k, record in enumerate(records[1:], start=2):
        oid = record[i_oid].strip() if len(record) > i_oid else ""
        if len(record) != width:
            dropped.append(Rejection(oid=oid or f"(line {k})",
                                     reason=f"BTS catalogue row has {len(record)} fields, the header {width}", rows=0))
            continue
        if not ZTF_OID.match(oid):
            dropped.append(Rejection(oid=oid or f"(line {k})", reason="BTS catalogue row: not a ZTF object id",
                                     rows=0))
            continue
        good.append([c.strip() for c in record])
    frame = pd.DataFrame(good, columns=header, dtype=object)
    frame = frame.rename(columns={"ZTFID": "oid", "type": "bts_type"})
    rows_in = len(frame)
    dup = frame["oid"].duplicated(keep="first")
    for oid in frame.loc[dup, "oid"]:
        dropped.append(Rejection(oid=str(oid), reason="BTS catalogue: a second row for the object (first kept)",
                                 rows=0))
    frame = frame.loc[~dup]
    frame["label"] = frame["bts_type"].map(map_type)
    typed = frame["label"].notna()
    rows = frame.loc[typed].sort_values("oid", kind="mergesort").reset_index(drop=True)
    return BtsCatalogue(rows=rows, rows_in=rows_in, untyped=int((~typed).sum()), dropped=dropped)


@dataclass
class Diff:
    """Typed catalogue entries against the stored types: what to fetch and what is already up to date."""

    new: pd.DataFrame  # never stored
    retyped: pd.DataFrame  # stored with another type
    unchanged: int
    unavailable: int  # failed for good with this same type: not asked again until re-typed

    @property
    def todo(self) -> pd.DataFrame:
        return pd.concat([self.new.assign(change="new"), self.retyped.assign(change="retyped")],
                         ignore_index=True).sort_values("oid", kind="mergesort").reset_index(drop=True)


def diff_catalogue(rows: pd.DataFrame, types: dict[str, str], unavailable: dict[str, str] | None = None) -> Diff:
    """The watermark of a catalogue without modification times: an entry is new when its oid was never stored,
    re-typed when its type differs from the stored one (compared as given, so a respelling counts too)."""
    unavailable = unavailable or {}
    oid, bts_type = rows["oid"].astype(str), rows["bts_type"].astype(str)
    stored = oid.map(types)
    gone = (oid.map(unavailable) == bts_type).to_numpy()
    is_new = stored.isna().to_numpy() & ~gone
    retyped = stored.notna().to_numpy() & (stored != bts_type).to_numpy() & ~gone
    return Diff(new=rows.loc[is_new], retyped=rows.loc[retyped],
                unchanged=int((stored == bts_type).sum()), unavailable=int(gone.sum()))


def download(params: BtsParams, call: Caller, session: requests.Session | None = None) -> str:
    """The catalogue as text (retries by ``call``)."""
    own = session is None
    session = session or requests.Session()

    def get() -> str:
        response = session.get(params.url, params=params.query, timeout=params.timeout_s)
        response.raise_for_status()
        text = response.content.decode(response.encoding or "utf-8", errors="replace")
        if text.strip() and not text.lstrip("\ufeff").lstrip().startswith("<"):
            parse_catalogue(text)  # raises TruncatedBody for a body cut inside a row (retried)
        return text

    try:
        return call(get)
    finally:
        if own:
            session.close()


def _alerce_like(params: IngestParams):
    """The retry settings of the catalogue download, in the shape :class:`Caller` reads."""
    return params.alerce.model_copy(update={"base_url": params.bts.url, "max_attempts": params.bts.max_attempts})


def read_types(raw_dir: Path) -> dict[str, str]:
    """oid -> the exact BTS type stored (the objects table keeps the label group; this keeps the type)."""
    return dict(RawStore(raw_dir).read_state().get(STATE_KEY, {}).get("types", {}))


def pull(params: IngestParams, raw_dir: Path, base: BaseParams, step: Progress = silent,
         call: Caller | None = None, clients_factory: Callable[[Any], Any] | None = None) -> IngestResult:
    """One incremental BTS pull into the raw store at ``raw_dir``; see the module docstring."""
    bp, ap = params.bts, params.alerce
    store = RawStore(raw_dir)
    current = store.read()
    state = store.read_state()
    bstate = dict(state.get(STATE_KEY, {}))
    types: dict[str, str] = dict(bstate.get("types", {}))
    unavailable: dict[str, str] = dict(bstate.get("unavailable", {}))
    label_changes: dict[str, str] = dict(bstate.get("label_changes", {}))
    started_at = pd.Timestamp.now(tz="UTC")

    step(f"downloading the BTS catalogue from {bp.url}")
    download_call = Caller(_alerce_like(params), RateLimiter(ap.requests_per_second), service="the BTS explorer",
                           url_setting="ingest.bts.url")
    try:
        text = download(bp, download_call)
    except RequestFailed as exc:
        message = (f"the BTS catalogue at {bp.url} could not be downloaded ({exc.reason}, {exc.attempts} "
                   "attempt(s)); nothing was changed")
        raise (CatalogueUnavailable if exc.transient else CatalogueRefused)(
            message + ("" if exc.transient else "; check ingest.bts.url and ingest.bts.query")) from exc
    catalogue = parse_catalogue(text)
    diff = diff_catalogue(catalogue.rows, types, unavailable)
    todo = diff.todo
    capped = len(todo) > bp.max_objects_per_pull
    todo = todo.iloc[:bp.max_objects_per_pull]
    type_of = dict(zip(todo["oid"], todo["bts_type"]))
    label_of = dict(zip(catalogue.rows["oid"], catalogue.rows["label"]))
    change_of = dict(zip(todo["oid"], todo["change"]))
    labels = pd.DataFrame({"oid": todo["oid"].astype(str), "label": todo["label"].astype(object),
                           "label_probability": float("nan")})

    call = call or Caller(ap, RateLimiter(ap.requests_per_second))
    clients = ThreadLocalClients(ap, clients_factory) if clients_factory else ThreadLocalClients(ap)
    reports = [ValidationReport("detections"), ValidationReport("non_detections")]
    dropped: list[Rejection] = list(catalogue.dropped)
    failures: list[Failure] = []
    fetched_ok: list[str] = []
    changed_now: list[str] = []
    counts: UpsertCounts | None = None
    before_objects = set(current.objects["oid"])

    def missing() -> list[dict[str, Any]]:
        out = [{"class": label_of.get(f.what, "(unknown)"), **f.as_dict()} for f in failures if f.transient]
        if capped:
            out.append({"class": "(all)", "what": "BTS entries past the cap", "attempts": 0, "transient": True,
                        "reason": f"max_objects_per_pull ({bp.max_objects_per_pull}) reached; the next pull "
                                  "continues"})
        return out

    def result(complete: bool) -> IngestResult:
        stored_label = dict(zip(current.objects["oid"], current.objects["label"]))
        groups = list(base.classes) + [g for g in OTHER_GROUPS if g not in base.classes]
        per_class: dict[str, dict[str, Any]] = {}
        for group in groups:
            in_group = catalogue.rows["label"] == group
            if not in_group.any() and group not in {"SNIa", "SNII"} & set(base.classes):
                continue  # the BTS types no quasars or Cepheids
            oids = set(catalogue.rows.loc[in_group, "oid"])
            ok = [o for o in fetched_ok if o in oids]
            per_class[group] = {
                "listed": int(in_group.sum()),
                "new": sum(change_of.get(o) == "new" for o in oids),
                "retyped": sum(change_of.get(o) == "retyped" for o in oids),
                "fetched": len(ok),
                "objects_new": sum(o not in before_objects and o in stored_label for o in ok),
                "objects_updated": sum(o in before_objects for o in ok),
                "label_changes": sum(o in oids for o in changed_now),
                "failures": [f.as_dict() for f in failures if f.what in oids],
                "listing_complete": True,
            }
        stored_counts = current.objects["label"].fillna("(none)").value_counts().sort_index()
        return IngestResult(
            source="bts", raw_dir=raw_dir,
            objects_per_class={str(k): int(v) for k, v in stored_counts.items()},
            detections=len(current.detections), non_detections=len(current.non_detections),
            reports=reports, objects_dropped=dropped, counts=counts, per_class=per_class, complete=complete,
            missing=missing(),
            extra={"url": bp.url, "started_at": str(started_at), "catalogue_rows": catalogue.rows_in,
                   "untyped": catalogue.untyped, "typed": len(catalogue.rows), "new": len(diff.new),
                   "retyped": len(diff.retyped), "unchanged": diff.unchanged,
                   "skipped_unavailable": diff.unavailable, "label_changes": len(changed_now),
                   "changed_labels": sorted(changed_now), "alerce_base_url": ap.base_url,
                   "requests": call.requests_made + download_call.requests_made,
                   "retries": call.retries + download_call.retries},
        )

    def commit(final: bool) -> IngestResult:
        res = result(complete=final and not missing())
        store.commit(current, res.manifest(), rejections=res.rejections_frame(),
                     state={**state, STATE_KEY: {"version": STATE_VERSION, "types": types,
                                                 "unavailable": unavailable, "label_changes": label_changes,
                                                 "last_pull": str(started_at)}})
        return res

    oids = list(todo["oid"])
    for fetched, failed in fetch_in_chunks(clients, call, oids, ap.concurrency, ap.commit_every, step):
        failures += failed
        unavailable.update({f.what: type_of[f.what] for f in failed if not f.transient})
        mapped = light_curve_tables(fetched, labels, "bts", SPECTROSCOPIC)
        batch, chunk_reports, chunk_dropped = prepare_batch(mapped, params, base, pd.Timestamp.now(tz="UTC"),
                                                            silent, keep_unlabelled=True)
        old = current.objects.set_index("oid")[["label", "label_source"]]
        current, chunk_counts = upsert(current, batch)
        counts = chunk_counts if counts is None else counts + chunk_counts
        reports = [r.merge(c) for r, c in zip(reports, chunk_reports)]
        dropped += chunk_dropped
        now = str(pd.Timestamp.now(tz="UTC"))
        for oid, label in zip(batch.objects["oid"], batch.objects["label"]):
            if oid in old.index and (old.at[oid, "label"] != label or old.at[oid, "label_source"] != SPECTROSCOPIC):
                label_changes[oid] = now  # a stored object's label changed (re-typed, or was a classifier's)
                changed_now.append(oid)
        for f in fetched:
            types[f.oid] = type_of[f.oid]
            unavailable.pop(f.oid, None)
            fetched_ok.append(f.oid)
        commit(final=False)

    step(f"writing {raw_dir}")
    return commit(final=True)


def label_changes_since(raw_dir: Path, since: pd.Timestamp | None) -> int:
    """Stored objects whose label a BTS pull changed (re-typed, or replacing a classifier's) after ``since``."""
    changes = RawStore(raw_dir).read_state().get(STATE_KEY, {}).get("label_changes", {})
    if since is None:
        return len(changes)
    return sum(pd.Timestamp(at) > since for at in changes.values())
