"""Every figure the project draws (matplotlib PNGs on the Agg backend: no display needed), in one module:

* evaluation: confusion matrices, reliability diagrams, early-classification curves;
* the paper's exploratory figures: how many objects of each class each source gives (:func:`class_distribution`),
  and what the model input of each class looks like on average (:func:`mean_profiles`);
* one object's light curve with its GP (:func:`plot_object`), computed by the model-input path
  (:func:`deeprubin.lightcurves.tensorize.interpolate_one`): detections (flux in µJy with 1σ errors), non-detections
  (5σ upper limits from ``diffmaglim``, downward triangles), the GP mean and ±1σ band over the model's window.

Conventions shared by the functions here:

* Class order: the ``classes`` argument when given; otherwise the classes of :data:`deeprubin.schema.CLASSES` that
  occur, in that order, followed by any other observed labels in alphabetical order.
* Missing labels (None / NaN: unlabelled objects) are ignored silently. When ``classes`` is given, labels outside it
  are dropped and a :class:`UserWarning` names them with their counts (they are not silently folded into a class).
* A class in ``classes`` without any object is kept, with count 0 (:func:`class_distribution`) or ``n == 0`` and NaN
  statistics (:func:`mean_profiles`); the plots show it as an empty bar / an empty panel saying so.
"""

from __future__ import annotations

import errno
import os
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from deeprubin.lightcurves.tensorize import CHANNELS, interpolate_one
from deeprubin.schema import AB_ZERO_POINT_UJY, BAND_INDEX, BANDS, CLASSES, LightCurves

BAND_COLOURS = {"g": "#2ca02c", "r": "#d62728"}
DEFAULT_CHANNELS: tuple[str, ...] = CHANNELS
DISTRIBUTION_COLUMNS = ["label", "source", "count"]
PROFILE_COLUMNS = ["label", "band", "day", "mean", "std", "gp_std_mean", "n"]


def _present(values: pd.Series) -> pd.Series:
    """True where a label is given (not None / NaN / empty)."""
    return values.notna() & (values.astype(str).str.strip() != "")


def _class_order(observed: Sequence[str], classes: Sequence[str] | None) -> list[str]:
    if classes is not None:
        return [str(c) for c in classes]
    seen = set(observed)
    return [c for c in CLASSES if c in seen] + sorted(seen - set(CLASSES))


def _drop_unknown(labels: pd.Series, order: Sequence[str], what: str) -> pd.Series:
    """Boolean mask of labels in ``order``; warns about the others (with counts)."""
    known = labels.isin(list(order))
    if not known.all():
        counts = labels[~known].value_counts().sort_index()
        listed = ", ".join(f"{k!r}: {v}" for k, v in counts.items())
        warnings.warn(f"{what}: ignoring {int((~known).sum())} object(s) with labels outside classes "
                      f"{list(order)} ({listed})", UserWarning, stacklevel=3)
    return known


# --------------------------------------------------------------------------------------------------------------
# Class distribution
# --------------------------------------------------------------------------------------------------------------


def class_distribution(objects: pd.DataFrame, classes: Sequence[str] | None = None) -> pd.DataFrame:
    """Number of labelled objects per class and source, as a tidy frame with columns ``label, source, count``.

    ``objects`` needs columns ``label`` and ``source`` (e.g. ``simulator``, ``bts``/``files``, ``alerce``); with an
    ``oid`` column, an object listed twice under the same label and source is counted once. A missing source is
    counted under ``"unknown"``. The result is the full grid of classes x sources (so a class that a source lacks
    has a row with count 0), sorted by class (see the module's class order) and then source (alphabetical); counts
    are int64. Unlabelled objects are not counted; see the module docstring for labels outside ``classes``.
    With no labelled objects there are no sources, so the frame is empty.
    """
    missing = {"label", "source"} - set(objects.columns)
    if missing:
        raise KeyError(f"objects lacks column(s) {sorted(missing)}")
    frame = objects.loc[_present(objects["label"])].copy()
    frame["label"] = frame["label"].astype(str)
    frame["source"] = frame["source"].where(_present(frame["source"]), "unknown").astype(str)
    order = _class_order(frame["label"].unique().tolist(), classes)
    frame = frame.loc[_drop_unknown(frame["label"], order, "class_distribution")]

    if "oid" in frame.columns:
        counts = frame.groupby(["label", "source"])["oid"].nunique()
    else:
        counts = frame.groupby(["label", "source"]).size()
    sources = sorted(frame["source"].unique())
    grid = pd.MultiIndex.from_product([order, sources], names=["label", "source"])
    out = counts.reindex(grid, fill_value=0).rename("count").reset_index()
    out["count"] = out["count"].astype("int64")
    return out[DISTRIBUTION_COLUMNS].reset_index(drop=True)


def plot_class_distribution(dist: pd.DataFrame, path: str | Path, title: str | None = None) -> Path:
    """PNG of a :func:`class_distribution`: grouped bars (one group per class, one bar per source), each bar
    annotated with its count. Classes and sources appear in the frame's order. Returns the path."""
    labels = list(pd.unique(dist["label"]))
    sources = list(pd.unique(dist["source"]))
    counts = dist.pivot_table(index="label", columns="source", values="count", aggfunc="sum", fill_value=0)
    counts = counts.reindex(index=labels, columns=sources, fill_value=0)
    total = int(dist["count"].sum())

    fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * len(labels) * max(1, len(sources)) ** 0.5 + 2.5), 4.2))
    if not labels or not sources:
        ax.text(0.5, 0.5, "no labelled objects", ha="center", va="center", transform=ax.transAxes)
        ax.set_xticks([])
    else:
        width = 0.8 / len(sources)
        xs = np.arange(len(labels), dtype=float)
        for k, source in enumerate(sources):
            values = counts[source].to_numpy()
            bars = ax.bar(xs + (k - (len(sources) - 1) / 2) * width, values, width=width, color=f"C{k}",
                          edgecolor="black", label=str(source))
            ax.bar_label(bars, labels=[f"{int(v)}" for v in values], fontsize=8, padding=2)
        ax.set_xticks(xs, labels=[str(label) for label in labels])
        ax.margins(y=0.12)
        ax.legend(title="source")
    ax.set_xlabel("class")
    ax.set_ylabel("objects")
    ax.set_title(title or f"Objects per class and source (n = {total})")
    return _save(fig, path)


# --------------------------------------------------------------------------------------------------------------
# Mean model input per class
# --------------------------------------------------------------------------------------------------------------


def mean_profiles(x: np.ndarray, labels: Sequence[str], channels: Sequence[str] = DEFAULT_CHANNELS,
                  classes: Sequence[str] | None = None) -> pd.DataFrame:
    """The average model input of each class, per band and grid day, as a tidy frame with columns
    ``label, band, day, mean, std, gp_std_mean, n``.

    ``x`` is the ``(N, C, G)`` tensor stack written by the preprocess stage, ``labels`` the N class names and
    ``channels`` the names of its C channels (it must include ``gp_mean_g`` and ``gp_mean_r``; ``gp_std_*`` are
    optional, giving NaN ``gp_std_mean`` without them). Per class, band and day ``0..G-1``: ``mean`` and ``std``
    are the mean and the population standard deviation (ddof 0, so 0 for a single object) across the class's
    objects of the ``gp_mean_<band>`` channel, i.e. of the normalised flux; ``gp_std_mean`` is the mean of
    ``gp_std_<band>`` (the typical GP uncertainty); ``n`` is the number of objects of the class. Non-finite tensor
    values are ignored. A class in ``classes`` without objects gets ``n == 0`` and NaN statistics. Rows are sorted
    by class (module's class order), band (g, r) and day.
    """
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 3:
        raise ValueError(f"x must be (N, C, G), got shape {arr.shape}")
    n_obj, n_chan, n_days = arr.shape
    channels = [str(c) for c in channels]
    if n_chan != len(channels):
        raise ValueError(f"x has {n_chan} channels but {len(channels)} channel names were given")
    lab = pd.Series(list(labels), dtype=object)
    if len(lab) != n_obj:
        raise ValueError(f"{len(lab)} labels for {n_obj} objects")
    for band in BANDS:
        if f"gp_mean_{band}" not in channels:
            raise ValueError(f"channels lack 'gp_mean_{band}': {channels}")

    has_label = _present(lab)
    lab = lab.where(has_label, "").astype(str)
    order = _class_order(lab[has_label].unique().tolist(), classes)
    keep = pd.Series(False, index=lab.index)
    keep[has_label] = _drop_unknown(lab[has_label], order, "mean_profiles")

    days = np.arange(n_days)
    parts = []
    for cls in order:
        rows = arr[(keep & (lab == cls)).to_numpy()]
        for band in BANDS:
            flux = rows[:, channels.index(f"gp_mean_{band}"), :]
            std_name = f"gp_std_{band}"
            gp_std = rows[:, channels.index(std_name), :] if std_name in channels else None
            with warnings.catch_warnings():  # an empty class / all-NaN day gives NaN, as documented
                warnings.simplefilter("ignore", RuntimeWarning)
                mean = np.nanmean(flux, axis=0) if len(rows) else np.full(n_days, np.nan)
                std = np.nanstd(flux, axis=0) if len(rows) else np.full(n_days, np.nan)
                gp_std_mean = (np.nanmean(gp_std, axis=0) if gp_std is not None and len(rows)
                               else np.full(n_days, np.nan))
            parts.append(pd.DataFrame({"label": cls, "band": band, "day": days, "mean": mean, "std": std,
                                       "gp_std_mean": gp_std_mean, "n": len(rows)}))
    if not parts:
        return pd.DataFrame({"label": pd.Series(dtype=object), "band": pd.Series(dtype=object),
                             "day": pd.Series(dtype="int64"), "mean": pd.Series(dtype="float64"),
                             "std": pd.Series(dtype="float64"), "gp_std_mean": pd.Series(dtype="float64"),
                             "n": pd.Series(dtype="int64")})
    out = pd.concat(parts, ignore_index=True)
    out["day"] = out["day"].astype("int64")
    out["n"] = out["n"].astype("int64")
    return out[PROFILE_COLUMNS]


def plot_mean_profiles(profiles: pd.DataFrame, path: str | Path, title: str | None = None) -> Path:
    """PNG of :func:`mean_profiles`: one panel per class (shared axes), the g and r mean normalised flux (green /
    red) against the day of the window, with the ±1σ spread across the class's objects shaded. A class without
    objects gets an empty panel saying so. Returns the path."""
    labels: list[Any] = list(pd.unique(profiles["label"]))
    k = max(1, len(labels))
    ncols = 2 if k == 4 else min(k, 3)
    nrows = -(-k // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.2 * nrows), sharex=True, sharey=True,
                             squeeze=False)
    flat = axes.ravel()
    n_days = int(profiles["day"].max()) + 1 if len(profiles) else 0
    for ax, label in zip(flat, labels):
        sub = profiles.loc[profiles["label"] == label]
        n = int(sub["n"].iloc[0]) if len(sub) else 0
        if n == 0:
            ax.text(0.5, 0.5, "no objects", ha="center", va="center", transform=ax.transAxes, color="grey")
        else:
            for band in BANDS:
                b = sub.loc[sub["band"] == band].sort_values("day")
                if b.empty:
                    continue
                colour = BAND_COLOURS.get(band)
                day, mean, std = b["day"].to_numpy(), b["mean"].to_numpy(), b["std"].to_numpy()
                ax.fill_between(day, mean - std, mean + std, color=colour, alpha=0.2, linewidth=0)
                ax.plot(day, mean, color=colour, label=f"{band} (mean ± 1σ)")
            ax.axhline(0.0, color="grey", lw=0.6, ls=":")
            ax.legend(loc="upper right", fontsize=8)
        ax.set_title(f"{label} (n = {n})")
        ax.grid(alpha=0.3)
    if not labels:
        flat[0].text(0.5, 0.5, "no objects", ha="center", va="center", transform=flat[0].transAxes, color="grey")
    xlabel = f"day of the {n_days}-day window" if n_days else "day of the window"
    used = max(1, len(labels))
    for i, ax in enumerate(flat):
        if i >= used:  # an unused cell of the last row: hide it, label the x axis of the panel above
            ax.set_visible(False)
            flat[i - ncols].xaxis.set_tick_params(labelbottom=True)
            flat[i - ncols].set_xlabel(xlabel)
        elif i >= used - ncols:  # the lowest panel of its column
            ax.set_xlabel(xlabel)
    for ax in axes[:, 0]:
        ax.set_ylabel("normalised flux")
    if title:
        fig.suptitle(title)
    return _save(fig, path)


# --------------------------------------------------------------------------------------------------------------
# Evaluation figures
# --------------------------------------------------------------------------------------------------------------


def plot_confusion_matrix(cm: Any, classes: Sequence[str], path: str | Path,
                          columns: Sequence[str] | None = None, title: str | None = None) -> Path:
    """PNG of a confusion matrix (rows true ``classes``, columns predicted ``columns``, default the same), coloured
    by row fraction and annotated with counts and row percentages. Returns the path."""
    counts = np.asarray(cm, dtype=float)
    columns = list(classes) if columns is None else list(columns)
    if counts.shape != (len(classes), len(columns)):
        raise ValueError(f"cm has shape {counts.shape}, expected ({len(classes)}, {len(columns)})")
    tot = counts.sum(axis=1, keepdims=True)
    frac = np.divide(counts, tot, out=np.zeros_like(counts), where=tot > 0)
    fig, ax = plt.subplots(figsize=(1.3 * len(columns) + 2.2, 1.1 * len(classes) + 1.8))
    im = ax.imshow(frac, cmap="Blues", vmin=0.0, vmax=1.0)
    for i in range(counts.shape[0]):
        for j in range(counts.shape[1]):
            ax.text(j, i, f"{int(counts[i, j])}\n{100 * frac[i, j]:.0f}%", ha="center", va="center", fontsize=10,
                    color="white" if frac[i, j] > 0.5 else "black")
    ax.set_xticks(range(len(columns)), labels=columns)
    ax.set_yticks(range(len(classes)), labels=list(classes))
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title or f"Confusion matrix (n = {int(counts.sum())})")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of true class")
    return _save(fig, path)


def reliability_figure(curve: pd.DataFrame, title: str | None = None) -> Any:
    """The figure of :func:`plot_reliability` (not saved; the caller closes it).

    Top panel, per confidence bin with objects, at the bin's centre: a bar up to the bin's accuracy (labelled
    ``accuracy``) and a marker at the bin's mean confidence (the mean top probability, labelled ``mean confidence``);
    the vertical gap between them is the bin's calibration error (confidence above the bar: over-confident), and the
    dashed diagonal is where the mean confidence of a bin lies. Bottom panel: objects per bin. The title gives the ECE
    computed from the curve."""
    used = (curve["count"] > 0).to_numpy()
    n = int(curve["count"].sum())
    accuracy = curve["accuracy"].to_numpy(dtype=float)
    confidence = curve["confidence"].to_numpy(dtype=float)
    counts = curve["count"].to_numpy(dtype=float)
    ece = float((counts[used] * np.abs(accuracy[used] - confidence[used])).sum() / n) if n else float("nan")
    width = (curve["bin_upper"] - curve["bin_lower"]).to_numpy()
    centres = ((curve["bin_upper"] + curve["bin_lower"]) / 2).to_numpy()
    fig, (ax, axc) = plt.subplots(2, 1, figsize=(5.5, 6.5), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    ax.plot([0, 1], [0, 1], ls="--", color="grey", label="perfectly calibrated")
    ax.bar(centres[used], accuracy[used], width=width[used], edgecolor="black", alpha=0.7, label="accuracy")
    ax.plot(centres[used], confidence[used], "o-", color="C3", label="mean confidence")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy / mean confidence")
    ax.legend(loc="upper left")
    ax.set_title(title or f"Reliability (top label), ECE = {ece:.3f}, n = {n}")
    axc.bar(centres, curve["count"], width=width, edgecolor="black", color="C0")
    axc.set_xlabel("confidence bin (top probability)")
    axc.set_ylabel("count")
    return fig


def plot_reliability(curve: pd.DataFrame, path: str | Path, title: str | None = None) -> Path:
    """PNG of a :func:`reliability_curve` (:func:`reliability_figure`: accuracy and mean confidence per bin against
    the diagonal, bin counts below). Returns the path."""
    return _save(reliability_figure(curve, title), path)


def plot_early_curve(curve: pd.DataFrame, path: str | Path, title: str | None = None) -> Path:
    """PNG of an :func:`early_classification_curve`: macro-F1 with its interval against days since first detection
    (log axis), each point labelled with its number of objects. Returns the path."""
    fig, ax = plt.subplots(figsize=(6, 4))
    d = curve["days"].to_numpy(dtype=float)
    ax.fill_between(d, curve["macro_f1_low"], curve["macro_f1_high"], alpha=0.25, color="C0", label="95% interval")
    ax.plot(d, curve["macro_f1"], "o-", color="C0", label="macro-F1")
    for x, y, n in zip(d, curve["macro_f1"], curve["n_objects"]):
        if np.isfinite(y):
            ax.annotate(f"n={int(n)}", (x, y), textcoords="offset points", xytext=(0, 7), ha="center", fontsize=8)
    if (d > 0).all():
        ax.set_xscale("log")
    ax.set_xticks(d, labels=[f"{x:g}" for x in d])
    ax.minorticks_off()
    ax.set_ylim(0, 1.1)
    ax.set_xlabel("days since first detection")
    ax.set_ylabel("macro-F1")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    ax.set_title(title or "Early classification")
    return _save(fig, path)


def _save(fig: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------------------------
# One light curve
# --------------------------------------------------------------------------------------------------------------


def plot_object(lcs: LightCurves, oid: str, out: Path | str, grid_days: int = 100, fit_context_days: float = 100.0,
                until_mjd: float | None = None) -> Path:
    """Write a PNG of object ``oid`` from contract tables ``lcs`` to ``out``; returns the path.

    Raises KeyError when ``oid`` has no detections. A GP that cannot be fitted still gives a plot of the data,
    with the reason in the title.
    """
    det = lcs.detections.loc[lcs.detections["oid"].astype(str) == str(oid)]
    if det.empty:
        raise KeyError(f"object {oid!r} has no detections in the store")
    nondet = lcs.non_detections.loc[lcs.non_detections["oid"].astype(str) == str(oid)]
    obj = lcs.objects.loc[lcs.objects["oid"].astype(str) == str(oid)]
    label = None if obj.empty or pd.isna(obj["label"].iloc[0]) else str(obj["label"].iloc[0])

    status, window, gp = "", None, None
    try:
        prep, gp = interpolate_one(det, grid_days, fit_context_days, until_mjd)
        window, status = prep.window, str(gp.status)
    except Exception as exc:  # noqa: BLE001 -- the data are still worth a picture
        status = f"no GP: {exc}"

    fig, ax = plt.subplots(figsize=(9, 4.8), dpi=110)
    if window is not None:
        # from the first detection the GP was given (at most fit_context_days before the window) to the window end
        fitted = det["mjd"].loc[det["mjd"] >= window.start_mjd - fit_context_days]
        lo, hi = min(float(fitted.min()), window.start_mjd), window.end_mjd
        ax.axvspan(window.start_mjd, window.end_mjd, color="0.93", zorder=0, label=f"{grid_days}-day window")
        ax.axvline(window.last_mjd, color="0.5", lw=0.8, ls=":", zorder=1)
    else:
        lo, hi = float(det["mjd"].min()), float(det["mjd"].max())
    pad = 0.03 * max(hi - lo, 1.0)
    lo, hi = lo - pad, hi + pad
    for band, colour in BAND_COLOURS.items():
        d = det.loc[(det["band"] == band) & det["mjd"].between(lo, hi)]
        if until_mjd is not None:
            d = d.loc[d["mjd"] <= until_mjd]
        ax.errorbar(d["mjd"], d["flux"], yerr=d["flux_err"], fmt="o", ms=3.5, color=colour, elinewidth=0.8,
                    capsize=0, label=f"{band} detections ({len(d)})", zorder=3)
        n = nondet.loc[(nondet["band"] == band) & nondet["mjd"].between(lo, hi)]
        if len(n):
            limit = 10.0 ** (-0.4 * (n["diffmaglim"].to_numpy(dtype=float) - AB_ZERO_POINT_UJY))
            ax.scatter(n["mjd"], limit, marker="v", s=14, color=colour, alpha=0.35, linewidths=0,
                       label=f"{band} upper limits ({len(n)})", zorder=2)
        if gp is not None and window is not None:
            x = window.grid_mjd()
            m, s = np.asarray(gp.mean)[BAND_INDEX[band]], np.asarray(gp.std)[BAND_INDEX[band]]
            ax.plot(x, m, color=colour, lw=1.4, zorder=4)
            ax.fill_between(x, m - s, m + s, color=colour, alpha=0.18, lw=0, zorder=1)
    ax.axhline(0.0, color="0.6", lw=0.6)
    ax.set_xlim(lo, hi)
    ax.set_xlabel("MJD")
    ax.set_ylabel("difference flux (µJy)")
    title = f"{oid}" + (f"  [{label}]" if label else "")
    if status:
        title += f"  GP: {status}"
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="best", ncols=2)
    fig.tight_layout()
    out = Path(out)
    if out.is_dir():
        plt.close(fig)
        raise IsADirectoryError(errno.EISDIR, "is a directory", str(out))
    out.parent.mkdir(parents=True, exist_ok=True)
    # written beside and renamed in: a failure leaves no half-written PNG, and an existing file whole
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, format="png")
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    finally:
        plt.close(fig)
        Path(tmp).unlink(missing_ok=True)
    return out
