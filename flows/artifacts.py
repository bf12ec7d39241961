"""Prefect artifacts with stable keys: each run adds a version, so the UI keeps the history night by night."""

from __future__ import annotations

from typing import Any

from prefect.artifacts import create_markdown_artifact, create_table_artifact

from deeprubin_flows.common import CLASSIFICATION_ARTIFACT, EVALUATION_ARTIFACT, PROMOTION_ARTIFACT, PULL_ARTIFACT


def pull_counts(pulled: dict[str, Any]) -> str:
    """'N objects new, M changed, K removed' (removed only when some were), with why when the simulator redrew."""
    counts = pulled["counts"]
    text = f"{counts['new']} objects new, {counts['changed']} changed"
    if counts.get("removed"):
        text += f", {counts['removed']} removed"
    if counts["changed"] and str(pulled["source"]).startswith("simulator"):
        # The simulator draws its whole sample anew from (seed, n_per_class, ...): another n_per_class gives every
        # oid another light curve, so a stored object can only be unchanged or redrawn, never kept and added to.
        text += " (redrawn: the simulator draws its whole sample anew when its parameters change)"
    return text


def pull_table(pulled: dict[str, Any], night: str) -> None:
    create_table_artifact(key=PULL_ARTIFACT, table=pulled["per_class"],
                          description=f"Objects stored per class after the pull from {pulled['source']} on {night}: "
                                      f"{pull_counts(pulled)}.")


def incomplete_pull(source: str, missing: list[dict[str, Any]]) -> None:
    lines = [f"# Incomplete pull from {source}", "",
             f"{len(missing)} listing page(s), cap(s) or object(s) missing; what was fetched is stored and the next "
             "pull (or the task's retry) picks these up.", "", "| class | missing | reason | attempts |",
             "|---|---|---|---|"]
    lines += [f"| {m.get('class', '')} | {m['what']} | {m['reason']} | {m.get('attempts', '')} |" for m in missing]
    create_markdown_artifact(key=PULL_ARTIFACT, markdown="\n".join(lines),
                             description=f"Pull from {source} incomplete: {len(missing)} missing")


def _fmt(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, float) else ("–" if value is None else str(value))


def evaluation(evaluated: dict[str, Any], trained: dict[str, Any]) -> None:
    lines = [f"# Evaluation of run `{trained['run_id']}`", "",
             f"Best validation macro-F1 {trained['best_val_macro_f1']:.3f} after {trained['epochs']} epochs.", "",
             "| model | set | macro-F1 | 95% interval | balanced accuracy | ECE | macro-F1 at 20 d |",
             "|---|---|---|---|---|---|---|"]
    for model, per_set in evaluated["metrics"].items():
        if not isinstance(per_set, dict):
            continue
        for name, m in per_set.items():
            if not isinstance(m, dict) or "macro_f1" not in m:
                continue
            e20 = m.get("early", {}).get("20d", {}).get("macro_f1")
            lines.append(f"| {model} | {name} | {_fmt(m['macro_f1'])} | [{_fmt(m.get('macro_f1_low'))}, "
                         f"{_fmt(m.get('macro_f1_high'))}] | {_fmt(m.get('balanced_accuracy'))} | "
                         f"{_fmt(m.get('ece'))} | {_fmt(e20)} |")
    for name, why in (evaluated.get("skipped") or {}).items():
        lines.append(f"\nSkipped {name}: {why}")
    create_markdown_artifact(key=EVALUATION_ARTIFACT, markdown="\n".join(lines),
                             description="Evaluation metrics of the night's model")


def promotion(decision: dict[str, Any]) -> None:
    ch, champ = decision.get("challenger") or {}, decision.get("champion") or {}
    lines = [f"# {decision['registered_model']} version {decision['version']}: **{decision['outcome']}**", "",
             decision["reason"], "",
             f"- champion before: {decision['champion_before'] or 'none'}; after: {decision['champion_after']}",
             f"- evaluation set: {decision['evaluation_set']} ({decision['set_hash']})",
             f"- {decision['metric']}: challenger {_fmt(ch.get('metric'))}, champion {_fmt(champ.get('metric'))}"]
    if decision.get("recall_drops"):
        lines.append("- recall drop per class: " + ", ".join(f"{c} {d:+.3f}"
                                                             for c, d in decision["recall_drops"].items()))
    create_markdown_artifact(key=PROMOTION_ARTIFACT, markdown="\n".join(lines),
                             description=f"Promotion decision: {decision['outcome']}")


def no_retraining(reason: str) -> None:
    create_markdown_artifact(key=PROMOTION_ARTIFACT, markdown=f"# No promotion tonight\n\nNo retraining: {reason}.",
                             description="Promotion decision: no retraining")


def rollback(done: dict[str, Any]) -> None:
    create_markdown_artifact(key=PROMOTION_ARTIFACT, markdown=f"# Rollback\n\n{done['reason']}.",
                             description="Promotion decision: rolled back")


def classifications(done: dict[str, Any], night: str) -> None:
    """Objects per predicted class in the night's file (earlier runs of the night included: it is upserted)."""
    table = [{"class": c, "objects": n} for c, n in sorted(done["per_class"].items())]
    now, in_file = done.get("classified_now", done["n_classified"]), done.get("objects_in_file", done["n_classified"])
    create_table_artifact(key=CLASSIFICATION_ARTIFACT, table=table or [{"class": "(none)", "objects": 0}],
                          description=f"{night}: {now} objects classified now with {done['model_uri']}, "
                                      f"{done['n_rejected']} rejected; the night's file {done['output']} holds "
                                      f"{in_file} objects (per predicted class below).")
