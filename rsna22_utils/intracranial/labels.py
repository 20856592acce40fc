"""The competition's labels and its row format: `ID_<image>_<label>,Label`, six rows per image.

`LABELS` is THE column order of every (batch, 6) tensor and wide table in this package, `any`
first as in the seed's loss weights [2, 1, 1, 1, 1, 1].
"""

from __future__ import annotations

import re

import numpy as np
import pandas as pd

from rsna22_utils.core.errors import MetricError
from rsna22_utils.core.metric import examples

SUBTYPES: tuple[str, ...] = ("epidural", "intraparenchymal", "intraventricular", "subarachnoid", "subdural")
LABELS: tuple[str, ...] = ("any",) + SUBTYPES
LABEL_WEIGHTS: dict[str, float] = {label: (2.0 if label == "any" else 1.0) for label in LABELS}
# the competition's files (`data_dir`)
TRAIN_LABELS = "stage_2_train.csv"
SAMPLE_SUBMISSION = "stage_2_sample_submission.csv"
TRAIN_DIR, TEST_DIR = "stage_2_train", "stage_2_test"

IMAGE_ID = "ID"  # the image id column of wide tables: `ID_<hex>`, the DICOM file's name without .dcm

_ROW_ID = re.compile(r"^(?P<image>ID_[0-9A-Za-z]+)_(?P<label>" + "|".join(LABELS) + r")$")


def split_row_ids(row_ids: pd.Series, what: str) -> tuple[pd.Series, pd.Series]:
    """(image id, label) of `ID_<hex>_<label>` row ids; anything else raises MetricError naming the rows."""
    parts = row_ids.astype(str).str.extract(_ROW_ID)
    bad = parts["image"].isna()
    if bad.any():
        raise MetricError(
            f"{what}: {int(bad.sum())} ID(s) are not 'ID_<image>_<label>' with a label in {list(LABELS)}: {examples(row_ids[bad])}"
        )
    return parts["image"], parts["label"]


def wide_from_rows(rows: pd.DataFrame, what: str, value: str = "Label") -> pd.DataFrame:
    """`ID,Label` rows (six per image) -> one row per image: ID + LABELS; an image without all six rows raises."""
    image, label = split_row_ids(rows["ID"], what)
    table = pd.DataFrame({IMAGE_ID: image, "label": label, "value": pd.to_numeric(rows[value], errors="coerce")})
    counts = table.groupby(IMAGE_ID, sort=False).size()
    incomplete = counts[counts != len(LABELS)]
    if len(incomplete):
        raise MetricError(f"{what}: {len(incomplete)} image(s) without all {len(LABELS)} label rows: {examples(incomplete.index)}")
    wide = table.pivot(index=IMAGE_ID, columns="label", values="value").reindex(columns=list(LABELS))
    wide = wide.loc[image.drop_duplicates()]  # the rows' image order
    return wide.reset_index().rename_axis(columns=None)


def rows_from_wide(wide: pd.DataFrame, value: str = "Label") -> pd.DataFrame:
    """One row per image (ID + LABELS) -> `ID,Label` rows, six per image in LABELS order."""
    ids = wide[IMAGE_ID].astype(str).to_numpy()
    row_ids = [f"{image}_{label}" for image in ids for label in LABELS]
    values = wide[list(LABELS)].to_numpy(dtype=np.float64).reshape(-1)
    return pd.DataFrame({"ID": row_ids, value: values})
