"""Champion/challenger promotion in the MLflow model registry (aliases, not stages).

Aliases of ``base.model_name``: ``champion`` (serving), ``challenger`` (the latest candidate), ``previous``
(the champion before the current one, for :func:`rollback`). A candidate version is always tagged ``challenger``; it
becomes ``champion`` only when :func:`decide` says so, comparing both versions' scores on **one** evaluation set
(the same objects, the same labels, fingerprinted by ``set_hash``):

- no champion yet: promoted (the first model);
- the challenger's metric must beat the champion's by more than ``min_improvement``;
- no class's recall may drop by more than ``max_recall_drop``.

``force`` (``deeprubin promote --force``) makes the candidate champion even when the gate rejects it: both versions
are still scored, and the decision says what the gate said (outcome ``forced``). A retrained model that only ties
the champion, as a rerun on the same data does, is rejected without it.

What a person reads on the registry page: the candidate version is tagged ``promotion/decision`` (promoted, rejected,
forced; later ``rolled_back``; a replaced champion also ``promotion/replaced_by``), and the decision with its reason
and the scores goes at the top of the version's description (paragraphs starting ``Promotion:``, :func:`with_decision`),
above what ``deeprubin register`` wrote there (the evaluation's headline numbers). A version keeps a handful of tags:
the numbers are metrics of its run and sentences of its description, never one tag each. The champion history is a
registered-model tag (``champion_history``: versions, oldest first), so a rollback knows what came before.

Two promotions at once: an alias names exactly one version, so the registry can never hold two champions; the
read-decide-write sequence runs under a lock (a file lock on this machine, keyed on the tracking URI and the model
name; the Prefect flows also hold a global concurrency limit), so the second promotion compares against the
outcome of the first, never against a champion that has already been replaced.
"""

from __future__ import annotations

import hashlib
import math
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

CHAMPION = "champion"
CHALLENGER = "challenger"
PREVIOUS = "previous"
HISTORY_TAG = "champion_history"
TAG_PREFIX = "promotion/"
DECISION_TAG = TAG_PREFIX + "decision"
REPLACED_TAG = TAG_PREFIX + "replaced_by"
#: Paragraphs of a version's description that record promotion events start with this; they stay at the top.
DESCRIPTION_PREFIX = "Promotion:"
#: MLflow stores a version's description in 5000 characters.
DESCRIPTION_MAX = 5000
MISSING = ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND")


class RegistryError(RuntimeError):
    """The registry is not in a state the operation can work from (no such version, nothing to roll back to)."""


@dataclass(frozen=True)
class Scores:
    """A model's numbers on the frozen evaluation set."""

    metric: float
    recall: dict[str, float]
    n_objects: int


@dataclass
class Decision:
    registered_model: str
    version: str
    promoted: bool
    reason: str
    champion_before: str | None
    champion_after: str | None
    metric: str
    evaluation_set: str = ""
    set_hash: str = ""
    challenger: dict[str, Any] | None = None
    champion: dict[str, Any] | None = None
    recall_drops: dict[str, float] = field(default_factory=dict)
    decided_at: str = ""
    #: Promoted by ``force`` although the gate rejected it.
    forced: bool = False

    @property
    def outcome(self) -> str:
        if self.forced:
            return "forced"
        return "promoted" if self.promoted else "rejected"

    def tags(self) -> dict[str, str]:
        """The candidate version's one promotion tag (``promotion/decision``); the rest is in :meth:`description`."""
        return {DECISION_TAG: self.outcome}

    def description(self) -> str:
        """The decision as the paragraph at the top of the version's description: outcome, when, the reason (with
        both scores), the set both were scored on, and the recall drops the bound looked at."""
        text = f"{DESCRIPTION_PREFIX} {self.outcome} ({self.decided_at}). Reason: {self.reason}."
        if self.challenger is not None:
            where = self.evaluation_set or "the promotion set"
            text += f" Scored on {where} ({self.challenger['n_objects']} objects"
            text += f", set {self.set_hash[:23]})" if self.set_hash else ")"
            if self.champion is not None:
                text += (f": this version {self.challenger['metric']:.4f}, champion (version {self.champion_before}) "
                         f"{self.champion['metric']:.4f} {self.metric}")
            text += "."
        if self.recall_drops:
            text += " Recall change vs the champion: " + ", ".join(
                f"{c} {-d:+.4f}" for c, d in sorted(self.recall_drops.items())) + "."
        return text

    def report(self) -> dict[str, Any]:
        return {**asdict(self), "outcome": self.outcome}


def decide(challenger: Scores, champion: Scores | None, metric: str, min_improvement: float,
           max_recall_drop: float) -> tuple[bool, str, dict[str, float]]:
    """``(promote?, reason, recall drop per class)``; pure, so every rule is unit-tested."""
    if champion is None:
        return True, "no champion yet: the first model is promoted", {}
    if not math.isfinite(challenger.metric):
        return False, f"the challenger's {metric} is not a number", {}
    drops = {c: round(champion.recall[c] - challenger.recall.get(c, 0.0), 6) for c in champion.recall
             if math.isfinite(champion.recall[c])}
    gain = challenger.metric - champion.metric
    if gain <= min_improvement:
        return False, (f"{metric} {challenger.metric:.4f} does not beat the champion's {champion.metric:.4f} by more "
                       f"than {min_improvement:g} (difference {gain:+.4f})"), drops
    worst = max(drops, key=drops.get) if drops else None
    if worst is not None and drops[worst] > max_recall_drop:
        return False, (f"{metric} improves by {gain:+.4f}, but the recall of {worst} drops by {drops[worst]:.4f} "
                       f"({champion.recall[worst]:.4f} -> {challenger.recall.get(worst, 0.0):.4f}), more than "
                       f"the bound {max_recall_drop:g}"), drops
    return True, (f"{metric} {challenger.metric:.4f} beats the champion's {champion.metric:.4f} by {gain:+.4f} "
                  f"(> {min_improvement:g}); no class's recall drops by more than {max_recall_drop:g}"), drops


def split_description(text: str | None) -> tuple[list[str], str]:
    """(the promotion paragraphs at the top of a version description, the rest)."""
    paragraphs = [p.strip() for p in (text or "").split("\n\n")]
    decision = []
    while paragraphs and paragraphs[0].startswith(DESCRIPTION_PREFIX):
        decision.append(paragraphs.pop(0))
    return decision, "\n\n".join(p for p in paragraphs if p)


def with_decision(text: str | None, paragraphs: list[str], replace: bool = False) -> str:
    """``text`` (a version description) with the promotion ``paragraphs`` at its top: after the ones already there,
    or instead of them (``replace``). The older promotion paragraphs are dropped first when the whole would not fit
    in MLflow's 5000 characters, then the end of the rest is cut."""
    kept, body = split_description(text)
    decision = list(paragraphs) if replace else kept + list(paragraphs)
    while True:
        out = "\n\n".join([*decision, body] if body else decision)
        if len(out) <= DESCRIPTION_MAX or len(decision) <= 1:
            break
        decision.pop(0)
    return out if len(out) <= DESCRIPTION_MAX else out[:DESCRIPTION_MAX - 1] + "…"


def _lock_path(tracking_uri: str, name: str) -> Path:
    key = hashlib.sha256(f"{tracking_uri}\n{name}".encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / "deeprubin-locks" / f"registry-{key}.lock"


class Registry:
    """The aliases and tags of one registered model."""

    def __init__(self, tracking_uri: str, name: str):
        import mlflow

        self.tracking_uri, self.name = tracking_uri, name
        self.client = mlflow.MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)

    @contextmanager
    def lock(self, timeout_s: float = 600.0) -> Iterator[None]:
        from filelock import FileLock, Timeout

        path = _lock_path(self.tracking_uri, self.name)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with FileLock(str(path), timeout=timeout_s):
                yield
        except Timeout:
            raise RegistryError(f"another promotion of {self.name} held the registry lock {path} for more than "
                                f"{timeout_s:g} s") from None

    def alias(self, alias: str) -> str | None:
        """The version an alias points to, or None."""
        from mlflow.exceptions import MlflowException

        try:
            return str(self.client.get_model_version_by_alias(self.name, alias).version)
        except MlflowException as exc:
            if exc.error_code in MISSING:
                return None
            raise  # a server or network error is not "no such alias"

    def aliases(self) -> dict[str, str]:
        return {a: v for a in (CHAMPION, CHALLENGER, PREVIOUS) if (v := self.alias(a)) is not None}

    def version(self, version: str):
        from mlflow.exceptions import MlflowException

        try:
            return self.client.get_model_version(self.name, str(version))
        except MlflowException as exc:
            raise RegistryError(f"{self.name} has no version {version}: {exc}") from None

    def history(self) -> list[str]:
        from mlflow.exceptions import MlflowException

        try:
            raw = self.client.get_registered_model(self.name).tags.get(HISTORY_TAG, "")
        except MlflowException:
            return []
        return [v for v in raw.split(",") if v]

    def set_history(self, versions: list[str]) -> None:
        # Bounded: the tag value is a string column; 200 champions is years of nights.
        self.client.set_registered_model_tag(self.name, HISTORY_TAG, ",".join(versions[-200:]))

    def set_alias(self, alias: str, version: str) -> None:
        self.client.set_registered_model_alias(self.name, alias, str(version))

    def tag(self, version: str, tags: dict[str, str]) -> None:
        for key, value in tags.items():
            self.client.set_model_version_tag(self.name, str(version), key, value)

    def untag(self, version: str, key: str) -> None:
        if key in (self.version(version).tags or {}):
            self.client.delete_model_version_tag(self.name, str(version), key)

    def describe(self, version: str, paragraphs: list[str], replace: bool = False) -> None:
        """Put promotion ``paragraphs`` at the top of the version's description (:func:`with_decision`)."""
        current = self.version(version).description
        self.client.update_model_version(self.name, str(version),
                                         description=with_decision(current, paragraphs, replace))


def promote(registry: Registry, version: str, score: Callable[[str], Scores], metric: str = "macro_f1",
            min_improvement: float = 0.0, max_recall_drop: float = 0.05, evaluation_set: str = "",
            set_hash: str = "", lock_timeout_s: float = 600.0, force: bool = False) -> Decision:
    """Tag ``version`` challenger and promote it to champion when :func:`decide` allows, or anyway with ``force``
    (outcome ``forced``, the gate's verdict kept in the reason); see the module docstring.

    ``score(model_uri)`` scores a version (``models:/<name>/<version>``) on the frozen evaluation set; it is called
    inside the lock, for the challenger and for whichever version is champion at that moment."""
    version = str(version)
    registry.version(version)  # a clear error for a version that does not exist
    with registry.lock(lock_timeout_s):
        champion = registry.alias(CHAMPION)
        registry.set_alias(CHALLENGER, version)
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        base = dict(registered_model=registry.name, version=version, metric=metric, evaluation_set=evaluation_set,
                    set_hash=set_hash, champion_before=champion, decided_at=stamp)
        if champion == version:  # nothing changes, nothing is written to the registry
            return Decision(**base, promoted=False, champion_after=champion,
                            reason=f"version {version} is already the champion")
        challenger_scores = score(f"models:/{registry.name}/{version}")
        champion_scores = None if champion is None else score(f"models:/{registry.name}/{champion}")
        promoted, reason, drops = decide(challenger_scores, champion_scores, metric, min_improvement,
                                         max_recall_drop)
        forced = force and not promoted
        if forced:
            promoted, reason = True, f"--force overrides the promotion gate, which rejects it: {reason}"
        decision = Decision(**base, promoted=promoted, reason=reason, recall_drops=drops, forced=forced,
                            champion_after=version if promoted else champion,
                            challenger=asdict(challenger_scores),
                            champion=None if champion_scores is None else asdict(champion_scores))
        if promoted:
            if champion is not None:
                registry.set_alias(PREVIOUS, champion)
                registry.tag(champion, {REPLACED_TAG: version})
                registry.describe(champion, [f"{DESCRIPTION_PREFIX} replaced as champion by version {version} "
                                             f"({stamp})."])
            # The one write that changes what serves: an alias moves atomically, never zero or two champions.
            registry.set_alias(CHAMPION, version)
            history = [v for v in registry.history() if v != version]
            if champion is not None and (not history or history[-1] != champion):
                history.append(champion)
            registry.set_history(history + [version])
        registry.tag(version, decision.tags())
        registry.describe(version, [decision.description()], replace=True)
        return decision


def _nothing_to_roll_back(registry: Registry, champion: str) -> str:
    """Why there is no ``previous`` (no promotion replaced a champion, or rollbacks used up the history) and what to
    do instead. A rejected candidate, e.g. a retrained model that only ties the champion, never sets it."""
    why = "the alias `previous` is set only when a promotion replaces a champion"
    challenger = registry.alias(CHALLENGER)
    if challenger is not None and challenger != champion:
        decision = (registry.version(challenger).tags or {}).get(DECISION_TAG)
        if decision == "rejected":
            why += f"; the last candidate, version {challenger}, was rejected by the promotion gate"
    return (f"{registry.name} has no previous champion to roll back to: version {champion} is champion and no "
            f"older champion is recorded ({why}). Nothing was changed. To serve another version, promote it: "
            f"deeprubin promote --version N (add --force to override the gate; a later rollback then restores "
            f"version {champion}).")


def rollback(registry: Registry, lock_timeout_s: float = 600.0) -> dict[str, Any]:
    """Make ``previous`` the champion again; the version before it (if any) becomes ``previous``.

    The demoted version is tagged ``promotion/decision=rolled_back`` and both versions' descriptions say so; raises
    RegistryError when there is no champion or nothing to roll back to (saying why, and what to do instead)."""
    with registry.lock(lock_timeout_s):
        champion, previous = registry.alias(CHAMPION), registry.alias(PREVIOUS)
        if champion is None:
            raise RegistryError(f"{registry.name} has no champion at {registry.tracking_uri}: nothing to roll back")
        if previous is None:
            raise RegistryError(_nothing_to_roll_back(registry, champion))
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        registry.set_alias(CHAMPION, previous)
        history = [v for v in registry.history() if v != champion]
        if not history or history[-1] != previous:
            history = [v for v in history if v != previous] + [previous]
        registry.set_history(history)
        before = history[-2] if len(history) >= 2 else None
        if before is not None:
            registry.set_alias(PREVIOUS, before)
        else:
            registry.client.delete_registered_model_alias(registry.name, PREVIOUS)
        reason = f"rolled back: version {previous} is champion again in place of {champion}"
        registry.tag(champion, {DECISION_TAG: "rolled_back"})
        registry.describe(champion, [f"{DESCRIPTION_PREFIX} rolled back ({stamp}). Reason: {reason}."])
        registry.untag(previous, REPLACED_TAG)
        registry.describe(previous, [f"{DESCRIPTION_PREFIX} champion again ({stamp}). Reason: version {champion} "
                                     "was rolled back."])
        return {"registered_model": registry.name, "champion_before": champion, "champion_after": previous,
                "previous_after": before, "reason": reason, "decided_at": stamp}
