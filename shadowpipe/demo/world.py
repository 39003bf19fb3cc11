"""The simulated world of the demo: a diagnostic model service and what happens to it.

The data is scikit-learn's Wisconsin breast-cancer set (569 real biopsies, 30 numeric
measurements, shipped inside scikit-learn, no download). A clinic network serves a
**primary** model (logistic regression on the ten ``mean_*`` measurements) and evaluates a
**challenger** (gradient boosting on all thirty, better offline) and a **control** (a copy
of the primary, which measures the noise floor).

Halfway through, clinic ``east`` installs scanner firmware that reports the ``worst_*``
measurements 30 % larger (a unit/calibration change upstream of the models). The primary
does not use them; the challenger leans on them and degrades in that one segment. A good
shadow pipeline must catch this before the challenger is promoted.

>>> world = World.build(seed=1)
>>> stream = list(world.requests(200, seed=1))
>>> len(stream), sorted(stream[0].features)[:2]
(200, ['area_error', 'compactness_error'])
>>> again = list(world.requests(200, seed=1))
>>> [r.features for r in again] == [r.features for r in stream]
True
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

CLINICS = ("north", "south", "east", "west")
CLINIC_WEIGHTS = (0.3, 0.25, 0.25, 0.2)
DEVICES = ("scanner_a", "scanner_b")
SHIFT_CLINIC = "east"
SHIFT_FACTOR = 1.3
LABELS = ("malignant", "benign")


@dataclass(frozen=True)
class Request:
    """One simulated request: what the service sees and the truth it learns later."""

    request_id: str
    offset_s: float  # simulated seconds since the start of the run
    features: dict[str, float]
    context: dict[str, str]
    label: str
    shifted: bool
    feedback_delay_s: float | None  # None: the outcome is never reported


@dataclass
class World:
    """Dataset, trained models and the rules of the simulation."""

    names: list[str]
    x: np.ndarray
    y: np.ndarray
    primary: Any
    challenger: Any
    primary_features: list[str]

    @classmethod
    def build(cls, seed: int = 7) -> World:
        """Load the data and train the primary and the challenger (deterministic)."""
        from sklearn.datasets import load_breast_cancer
        from sklearn.ensemble import GradientBoostingClassifier
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        data = load_breast_cancer()
        names = [n.replace(" ", "_") for n in data.feature_names]
        rng = np.random.default_rng(seed)
        train = rng.permutation(len(data.target))[:340]
        mean_cols = [i for i, n in enumerate(names) if n.startswith("mean_")]
        primary = make_pipeline(StandardScaler(), LogisticRegression(C=0.05, max_iter=1000))
        labels = np.array(LABELS)[data.target]  # models answer in the service's own labels
        primary.fit(data.data[train][:, mean_cols], labels[train])
        challenger = GradientBoostingClassifier(random_state=seed)
        challenger.fit(data.data[train], labels[train])
        return cls(names, data.data, data.target, primary, challenger,
                   [names[i] for i in mean_cols])

    def requests(
        self, count: int, seed: int = 7, span_s: float = 4 * 3600, shift_at: float = 0.5,
        feedback_coverage: float = 0.7, median_feedback_delay_s: float = 600.0,
    ) -> Iterator[Request]:
        """``count`` requests over ``span_s`` simulated seconds; the shift starts at
        ``shift_at`` (fraction of the run) in clinic ``east``."""
        rng = np.random.default_rng(seed)
        worst = np.array([n.startswith("worst_") for n in self.names])
        for i in range(count):
            row = int(rng.integers(len(self.y)))
            values = self.x[row] * (1.0 + rng.normal(0.0, 0.02, len(self.names)))
            clinic = CLINICS[int(rng.choice(len(CLINICS), p=CLINIC_WEIGHTS))]
            device = DEVICES[int(rng.integers(len(DEVICES)))]
            shifted = clinic == SHIFT_CLINIC and i >= shift_at * count
            if shifted:
                values = np.where(worst, values * SHIFT_FACTOR, values)
            labelled = rng.random() < feedback_coverage
            delay = float(rng.lognormal(np.log(median_feedback_delay_s), 1.0))
            yield Request(
                request_id=f"req-{seed}-{i:07d}",
                offset_s=i * span_s / count,
                features={n: round(float(v), 6) for n, v in zip(self.names, values, strict=True)},
                context={"clinic": clinic, "device": device},
                label=LABELS[int(self.y[row])],
                shifted=shifted,
                feedback_delay_s=delay if labelled else None,
            )

    def primary_predict(self, features: dict[str, float]) -> dict[str, Any]:
        """The primary's output for one request, as the service would compute it."""
        row = np.array([[features[n] for n in self.primary_features]])
        proba = self.primary.predict_proba(row)[0]
        classes = self.primary.classes_
        probabilities = {str(c): float(p) for c, p in zip(classes, proba, strict=True)}
        return {"label": max(probabilities, key=probabilities.__getitem__),
                "probabilities": probabilities}
