"""Label policies: which label a face trains on, decided from the opinions every row of the crop manifest and of
``splits.csv`` keeps. No files, no pixels: columns in, columns (or target vectors) out.

The opinions (columns :data:`OPINION_COLUMNS`):

* ``label_uploader``: what the person meant to show. AI Hub: ``faceExp_uploader``, or the file name's emotion
  when that is missing or not a known label; a folder set: its folder; TFEID: the performed expression.
* ``label_majority``: the annotators' (raters') majority: the label with the most votes, if no other has as many
  ("" on a tie or without votes). With three annotators that is "at least two agree".
* ``votes``: the votes per class, ``joy=2 anger=1`` (annotators, whole numbers) or ``joy=0.970 neutral=0.010``
  (rater shares, always written with a decimal point); "" without votes.
* ``agreement``: annotators on the top label (0-3); for rater shares 3 x the top share, as if three raters.
  Votes for labels that are no class count in the majority and the agreement but are not in ``votes``; a photo
  whose largest vote is for no class never reaches this table (the readers skip it, :func:`no_class_top`).

The policies (``data.label_policy``) and their hard label (the class folder, val and test, class weights):

* ``majority``: ``label_majority``, else ``label_uploader`` (a tie under ``data.vote_tie: uploader``, a photo
  without votes);
* ``uploader``: ``label_uploader``;
* ``soft``: the hard label of ``majority``; the training target is the vote distribution (:func:`targets`).

``data.min_agreement`` drops train photos whose ``agreement`` is below it (:func:`low_agreement`); photos without
votes have no annotators to disagree and are kept.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import pandas as pd

POLICIES = ("majority", "uploader", "soft")
OPINION_COLUMNS = ("label_uploader", "label_majority", "votes", "agreement")
#: rater shares (a votes table) weigh as this many annotators: AI Hub's three
SHARE_VOTERS = 3
#: the key prefix of a vote for a label that is no class (see :func:`opinions`)
NO_CLASS = "\0"


@dataclass(frozen=True, slots=True)
class Opinions:
    """One photo's opinions as the manifest columns hold them (strings, "" when unknown)."""

    uploader: str = ""
    majority: str = ""
    votes: str = ""
    agreement: str = ""

    def row(self) -> dict[str, str]:
        return dict(zip(OPINION_COLUMNS, (self.uploader, self.majority, self.votes, self.agreement), strict=True))


def format_votes(votes: Mapping[str, float], shares: bool) -> str:
    """``{"joy": 2, "anger": 1}`` -> ``"joy=2 anger=1"`` (largest first, then by name; zeros left out); shares with
    three decimals, so that a share of 1 reads ``1.000`` and is never taken for one annotator's vote."""
    items = sorted(((k, v) for k, v in votes.items() if v > 0), key=lambda kv: (-kv[1], kv[0]))
    return " ".join(f"{k}={v:.3f}" if shares else f"{k}={int(v)}" for k, v in items)


def parse_votes(text: str) -> tuple[dict[str, float], bool]:
    """The inverse of :func:`format_votes`: (votes by class, shares?). A malformed entry is a ValueError."""
    out: dict[str, float] = {}
    shares = False
    for item in str(text).split():
        name, sep, value = item.rpartition("=")
        if not sep or not name:
            raise ValueError(f"votes entry {item!r} is not <class>=<number>")
        shares |= "." in value
        out[name] = out.get(name, 0.0) + float(value)
    return out, shares


def majority_of(votes: Mapping[str, float]) -> str | None:
    """The label with the most votes when no other has as many; None on a tie or without votes."""
    ranked = sorted(((v, k) for k, v in votes.items() if v > 0), reverse=True)
    if not ranked or (len(ranked) > 1 and ranked[1][0] == ranked[0][0]):
        return None
    return ranked[0][1]


def opinions(uploader: str | None, votes: Mapping[str, float], shares: bool) -> Opinions:
    """The opinions of one photo from its uploader's class and its votes: by class, and by :data:`NO_CLASS` +
    label for a label that is no class (unknown, not a face, a class the label map leaves out). Those still count:
    they can block or win the majority (a majority for one leaves ``label_majority`` empty) and they weigh in
    ``agreement``, but they are left out of the ``votes`` column (and so of soft targets). ``shares``: the values
    are shares of every rater (a votes table's rows, normalized over all their columns); else annotators' votes."""
    votes = {k: float(v) for k, v in votes.items() if v > 0}
    if not votes:
        return Opinions(uploader or "")
    top = majority_of(votes)
    class_votes = {k: v for k, v in votes.items() if not k.startswith(NO_CLASS)}
    most = max(votes.values())
    agreement = f"{SHARE_VOTERS * most / sum(votes.values()):.2f}" if shares else str(int(most))
    return Opinions(uploader or "", top if top and not top.startswith(NO_CLASS) else "",
                    format_votes(class_votes, shares), agreement)


def no_class_top(votes: Mapping[str, float]) -> list[str]:
    """The labels that are no class holding the largest vote when no class holds as much (else []): such a photo
    is a face of no class (FER+'s ``nf``: not a face at all) and never trains as its folder's label."""
    votes = {k: v for k, v in votes.items() if v > 0}
    if not votes:
        return []
    most = max(votes.values())
    top = [k for k, v in votes.items() if v == most]
    return sorted(k[len(NO_CLASS):] for k in top) if all(k.startswith(NO_CLASS) for k in top) else []


def strict_majority(votes: str) -> str:
    """The class named by more than half of all raters, "" when none: how FER+ scores (Barsoum et al. 2016). Rater
    shares (``joy=0.700``) are shares of every rater, those who named no class included, so "more than half" is a
    share above 0.5; whole-number votes are AI Hub's :data:`SHARE_VOTERS` annotators (at least 2 of 3)."""
    if not votes:
        return ""
    v, shares = parse_votes(votes)
    top = majority_of(v)
    total = 1.0 if shares else SHARE_VOTERS
    return top if top is not None and v[top] > total / 2 + 1e-9 else ""


# --- tables ---------------------------------------------------------------------------------------------------

def hard_labels(df: pd.DataFrame, policy: str) -> pd.Series:
    """Each row's hard label under ``policy`` ("" when it has none, e.g. no uploader label under ``uploader``)."""
    if policy not in POLICIES:
        raise ValueError(f"label policy {policy!r} is not one of {POLICIES}")
    if policy == "uploader":
        return df["label_uploader"].astype(str)
    majority = df["label_majority"].astype(str)
    return majority.where(majority != "", df["label_uploader"].astype(str))


def agreement_values(df: pd.DataFrame) -> np.ndarray:
    """The ``agreement`` column as floats, NaN for photos without votes."""
    return np.array([float(x) if x else np.nan for x in df["agreement"].astype(str)], dtype=np.float64)


def low_agreement(df: pd.DataFrame, min_agreement: int) -> np.ndarray:
    """Rows whose annotators agree less than ``min_agreement`` (photos without votes never are)."""
    if min_agreement <= 0:
        return np.zeros(len(df), dtype=bool)
    a = agreement_values(df)
    return ~np.isnan(a) & (a + 1e-9 < min_agreement)


def targets(df: pd.DataFrame, policy: str, classes: Sequence[str], uploader_weight: float,
            labels: Sequence[str] | None = None) -> np.ndarray:
    """float32 (rows, classes) training targets: one-hot of the hard label (``labels``, default the policy's), or
    under ``soft`` the normalized votes plus ``uploader_weight`` votes for ``label_uploader``. Rater shares count as
    :data:`SHARE_VOTERS` votes; votes for labels that are not classes are left out (the rest renormalized); a
    photo without votes is one-hot. Label smoothing is the loss's (``train.label_smoothing``)."""
    index = {c: i for i, c in enumerate(classes)}
    hard = list(hard_labels(df, policy) if labels is None else labels)
    unknown = sorted(set(hard) - set(index))
    if unknown:
        raise ValueError(f"labels {unknown} are not in params classes {list(classes)}")
    out = np.zeros((len(df), len(classes)), np.float32)
    out[np.arange(len(df)), [index[h] for h in hard]] = 1.0
    if policy != "soft":
        return out
    for i, (text, uploader) in enumerate(zip(df["votes"].astype(str), df["label_uploader"].astype(str),
                                             strict=True)):
        if not text:
            continue
        votes, shares = parse_votes(text)
        v = np.zeros(len(classes), np.float64)
        for name, n in votes.items():
            if name in index:
                v[index[name]] += n
        if v.sum() <= 0:
            continue
        if shares:
            v *= SHARE_VOTERS / v.sum()
        if uploader_weight > 0 and uploader in index:
            v[index[uploader]] += uploader_weight
        out[i] = (v / v.sum()).astype(np.float32)
    return out


class AgreementTally:
    """Per class of ``label_uploader``: photos, those with votes, how often the annotators' majority names the same
    class, and the mean agreement; plus the histogram of ``agreement``. Added up row by row (the crop stage streams
    its manifest), so the crop report and evaluate share one definition. What a user weighs choosing a policy."""

    def __init__(self) -> None:
        self.rows: dict[str, list[float]] = {}  # class -> [photos, with votes, majority == uploader, agreement sum]
        self.histogram: dict[str, int] = {}

    def add(self, uploader: str, majority: str, votes: str, agreement: str) -> None:
        r = self.rows.setdefault(uploader, [0, 0, 0, 0.0])
        r[0] += 1
        if not votes:
            self.histogram["none"] = self.histogram.get("none", 0) + 1
            return
        r[1] += 1
        r[2] += majority == uploader
        r[3] += float(agreement)
        key = str(round(float(agreement)))
        self.histogram[key] = self.histogram.get(key, 0) + 1

    def add_frame(self, df: pd.DataFrame) -> AgreementTally:
        for row in zip(*(df[c].astype(str) for c in OPINION_COLUMNS), strict=True):
            self.add(*row)
        return self

    def table(self, classes: Sequence[str]) -> dict[str, dict]:
        out = {}
        for c in [*classes, *sorted(set(self.rows) - set(classes))]:
            photos, voted, same, total = self.rows.get(c, (0, 0, 0, 0.0))
            out[c or "(none)"] = {
                "photos": int(photos),
                "with_votes": int(voted),
                "majority_is_uploader": int(same),
                "majority_is_uploader_fraction": round(same / voted, 4) if voted else None,
                "mean_agreement": round(total / voted, 3) if voted else None,
            }
        return out

    def report(self, classes: Sequence[str]) -> dict:
        """``{"agreement": {"none"|"0".."3": photos}, "per_class": table}``; "none": photos without votes."""
        return {"agreement": dict(sorted(self.histogram.items())), "per_class": self.table(classes)}
