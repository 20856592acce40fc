"""03_smooth: slice-position smoothing, its own stage: each image's prediction refined from its neighbours'.

A haemorrhage spans neighbouring slices, so for each label the slice's prediction and those of the
`neighbours` slices on each side (in the study's z order; the edge slice repeats itself), as logits,
are the features of one logistic regression, fitted on the out-of-fold predictions of 02 (never on predictions of
models that saw the image). Its own score is measured out of fold too (fitted on the other folds'
images, applied to each fold's); a label keeps its smoothing only where that lowers its out-of-fold log
loss (else its 02 prediction passes through, with a warning). It is then refitted on every training image
and applied to the test predictions. Writes `oof_smoothed.parquet`, `smoothing.json` (the fitted coefficients),
`submission.csv` (exactly the sample submission's IDs, in its order) and `metrics.json`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from rsna22_utils.core.files import atomic_write
from rsna22_utils.core.registry import stage_dir
from rsna22_utils.intracranial.configs import SmoothConfig
from rsna22_utils.intracranial.labels import IMAGE_ID, LABELS, SAMPLE_SUBMISSION, wide_from_rows
from rsna22_utils.intracranial.metric import per_label_log_loss, score_wide
from rsna22_utils.intracranial.predict import OOF_PREDICTIONS, TEST_PREDICTIONS
from rsna22_utils.intracranial.prepare import Prepared
from rsna22_utils.intracranial.stages import PREDICT

logger = logging.getLogger(__name__)

SMOOTHING_FILE = "smoothing.json"
_CLIP = 1e-6  # probabilities -> logits without infinities


def neighbour_features(predictions: pd.DataFrame, images: pd.DataFrame, neighbours: int) -> np.ndarray:
    """(images, 2 * neighbours + 1, 6) logits of each image's neighbours' predictions (offset -neighbours first),
    rows as `predictions`."""
    table = predictions.merge(images[[IMAGE_ID, "StudyInstanceUID", "slice_index", "n_slices"]], on=IMAGE_ID, how="left")
    if table["StudyInstanceUID"].isna().any():
        raise ValueError(f"{int(table['StudyInstanceUID'].isna().sum())} predicted images are not in images.parquet")
    probabilities = np.clip(table[list(LABELS)].to_numpy(np.float64), _CLIP, 1 - _CLIP)
    logits = np.log(probabilities / (1 - probabilities))
    # row of each (study, slice_index) in `table`, to look the neighbours up
    position = {(s, int(i)): r for r, (s, i) in enumerate(zip(table["StudyInstanceUID"], table["slice_index"]))}
    features = []
    for offset in range(-neighbours, neighbours + 1):
        rows = []
        for study, index, n in zip(table["StudyInstanceUID"], table["slice_index"], table["n_slices"]):
            wanted = int(min(max(index + offset, 0), n - 1))
            while (study, wanted) not in position:  # a neighbour without a prediction (unreadable): step back towards the slice
                wanted += 1 if wanted < index else -1
            rows.append(position[(study, wanted)])
        features.append(logits[rows])
    return np.stack(features, axis=1)


class Smoother:
    """One logistic regression per label on that label's neighbour logits (sklearn), saved as plain coefficients."""

    def __init__(self, neighbours: int, regularisation: float) -> None:
        self.neighbours, self.regularisation = neighbours, regularisation
        self.coef: dict[str, list[float]] = {}
        self.intercept: dict[str, float] = {}
        self.prevalence: dict[str, float] = {}  # of the training images: what an image without a prediction gets

    @classmethod
    def from_json(cls, path: Path) -> Smoother:
        """A smoother saved by 03_smooth (`smoothing.json`)."""
        if not Path(path).is_file():
            raise FileNotFoundError(f"{path}: no smoothing coefficients; run 03_smooth (or ship its smoothing.json with the weights)")
        data = json.loads(Path(path).read_text())
        smoother = cls(int(data["neighbours"]), float(data.get("regularisation", 1.0)))
        smoother.coef, smoother.intercept, smoother.prevalence = data["coef"], data["intercept"], data["prevalence"]
        return smoother

    def fit(self, features: np.ndarray, labels: pd.DataFrame) -> Smoother:
        from sklearn.linear_model import LogisticRegression

        self.prevalence = {label: float(labels[label].mean()) for label in LABELS}
        for k, label in enumerate(LABELS):
            y = labels[label].to_numpy().astype(int)
            if len(np.unique(y)) < 2:  # one class: keep the model's own prediction (the centre slice's logit)
                self.keep_model_prediction(label)
                continue
            model = LogisticRegression(C=self.regularisation, max_iter=1000).fit(features[:, :, k], y)
            self.coef[label], self.intercept[label] = model.coef_[0].tolist(), float(model.intercept_[0])
        return self

    def keep_model_prediction(self, label: str) -> None:
        """`label` passes through unchanged (the centre slice's logit, weight 1, no intercept)."""
        self.coef[label] = [1.0 if offset == self.neighbours else 0.0 for offset in range(2 * self.neighbours + 1)]
        self.intercept[label] = 0.0

    def predict(self, features: np.ndarray, ids: np.ndarray) -> pd.DataFrame:
        out = {IMAGE_ID: ids}
        for k, label in enumerate(LABELS):
            z = features[:, :, k] @ np.asarray(self.coef[label]) + self.intercept[label]
            out[label] = 1.0 / (1.0 + np.exp(-z))
        return pd.DataFrame(out)

    def to_json(self) -> dict[str, Any]:
        return {
            "neighbours": self.neighbours,
            "regularisation": self.regularisation,
            "labels": list(LABELS),
            "coef": self.coef,
            "intercept": self.intercept,
            "prevalence": self.prevalence,
        }


def _read(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; run {PREDICT} first")
    return pd.read_parquet(path)


def smooth(cfg: SmoothConfig) -> dict[str, Any]:
    """03_smooth: fit on the out-of-fold predictions (scored out of fold), apply to the test predictions, write submission.csv."""
    prepared = Prepared(Path(cfg.prepared_dir))
    images = prepared.read_images()
    predicted = stage_dir(cfg.work_dir, PREDICT)
    oof = _read(predicted / OOF_PREDICTIONS)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    labels = images.set_index(IMAGE_ID).loc[oof[IMAGE_ID]].reset_index()
    features = neighbour_features(oof, images, cfg.neighbours)
    smoothed = []
    for fold in sorted(labels["fold"].unique()):
        held = (labels["fold"] == fold).to_numpy()
        smoother = Smoother(cfg.neighbours, cfg.regularisation).fit(features[~held], labels[~held])
        smoothed.append(smoother.predict(features[held], oof[IMAGE_ID].to_numpy()[held]))
    oof_smoothed = pd.concat(smoothed, ignore_index=True).set_index(IMAGE_ID).loc[oof[IMAGE_ID]].reset_index()
    # A label keeps its smoothing only where it lowers that label's out-of-fold log loss: a smoother fitted on
    # some folds' models can be miscalibrated for another fold's model (steep slopes learnt from confident ones).
    before, after = per_label_log_loss(labels, oof), per_label_log_loss(labels, oof_smoothed)
    kept = {label: after[label] < before[label] for label in LABELS}
    for label in LABELS:
        if not kept[label]:
            oof_smoothed[label] = oof[label].to_numpy()
    dropped = [label for label in LABELS if not kept[label]]
    if dropped:
        logger.warning("smoothing left out for %s: it raised their out-of-fold log loss (their 02 predictions pass through)", dropped)
    atomic_write(out / "oof_smoothed.parquet", lambda tmp: oof_smoothed.to_parquet(tmp, index=False))
    result: dict[str, Any] = {
        "oof_images": len(oof),
        "oof_metric_before": score_wide(labels, oof),
        "oof_metric": score_wide(labels, oof_smoothed),
        "smoothed_labels": [label for label in LABELS if kept[label]],
    }
    smoother = Smoother(cfg.neighbours, cfg.regularisation).fit(features, labels)
    for label in dropped:
        smoother.keep_model_prediction(label)
    (out / SMOOTHING_FILE).write_text(json.dumps(smoother.to_json(), indent=2) + "\n")
    logger.info(
        "smoothing: out-of-fold metric %.4f -> %.4f; wrote %s", result["oof_metric_before"], result["oof_metric"], out / SMOOTHING_FILE
    )
    test_path = predicted / TEST_PREDICTIONS
    if test_path.is_file():
        test = pd.read_parquet(test_path)
        final = smoother.predict(neighbour_features(test, images, cfg.neighbours), test[IMAGE_ID].to_numpy())
        result.update(write_submission(final, _sample_submission(cfg, prepared), out / "submission.csv", fill=smoother.prevalence))
    (out / "metrics.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def _sample_submission(cfg: SmoothConfig, prepared: Prepared) -> Path:
    data_dir = cfg.data_dir or json.loads((prepared.root / "prepare.json").read_text())["data_dir"]
    return Path(data_dir) / SAMPLE_SUBMISSION


def write_submission(predictions: pd.DataFrame, sample_path: Path, out: Path, fill: dict[str, float]) -> dict[str, Any]:
    """submission.csv with exactly the sample submission's IDs in its order; an image without a prediction (unreadable)
    gets `fill` (the training prevalence) and is counted."""
    sample = pd.read_csv(sample_path, dtype={"ID": str})
    wide = wide_from_rows(sample, str(sample_path))
    missing = ~wide[IMAGE_ID].isin(set(predictions[IMAGE_ID]))
    if missing.any():
        logger.warning("%s: %d test images have no prediction; the training prevalence fills them", sample_path, int(missing.sum()))
    values = predictions.set_index(IMAGE_ID).reindex(wide[IMAGE_ID])
    for label in LABELS:
        values[label] = values[label].fillna(float(fill[label]))
    by_row = {f"{image}_{label}": float(values.at[image, label]) for image in values.index for label in LABELS}
    submission = pd.DataFrame({"ID": sample["ID"], "Label": sample["ID"].map(by_row)})
    atomic_write(out, lambda tmp: submission.to_csv(tmp, index=False))
    logger.info("wrote %s (%d rows, the sample submission's IDs)", out, len(submission))
    return {"submission": str(out), "submission_rows": len(submission), "images_without_prediction": int(missing.sum())}
