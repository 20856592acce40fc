"""The synthetic ICH competition: the real layout, readable DICOMs, patients with several studies, realistic prevalence."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pydicom
import pytest

from rsna22_utils.core.dicom import read_slice
from rsna22_utils.intracranial.labels import LABELS, wide_from_rows
from rsna22_utils.intracranial.synth import SLICES, generate_competition, make_specs


def test_layout_labels_and_headers(tmp_path):
    out = generate_competition(tmp_path / "ich", n_studies=6, n_test_studies=2, seed=1, image_size=64, workers=1)
    labels = pd.read_csv(out / "stage_2_train.csv")
    assert list(labels.columns) == ["ID", "Label"] and set(labels["Label"]) <= {0, 1}
    wide = wide_from_rows(labels, "stage_2_train.csv")  # six rows per image, or an error
    assert len(labels) == 6 * len(wide)
    assert sorted(wide["ID"] + ".dcm") == sorted(p.name for p in (out / "stage_2_train").iterdir())
    sample = wide_from_rows(pd.read_csv(out / "stage_2_sample_submission.csv"), "sample")
    assert sorted(sample["ID"] + ".dcm") == sorted(p.name for p in (out / "stage_2_test").iterdir())
    assert (wide["any"] == wide[list(LABELS[1:])].max(axis=1)).all()

    images = pd.read_csv(out / "_synthetic" / "images.csv")
    per_study = images.groupby("StudyInstanceUID").size()
    assert per_study.between(*SLICES).all()
    first = next((out / "stage_2_train").iterdir())
    ds = pydicom.dcmread(first)
    assert ds.Rows == ds.Columns == 64 and ds.BitsAllocated == 16 and "RescaleIntercept" in ds and "RescaleSlope" in ds
    row = images.set_index("ID").loc[first.stem]
    assert ds.PatientID == row["PatientID"] and ds.StudyInstanceUID == row["StudyInstanceUID"]
    hu, _ = read_slice(first)
    assert hu.min() <= -1000 and hu.max() >= 1000  # air around the head, bone in it


def test_patients_studies_and_prevalence():
    specs = make_specs(600, 0, seed=0, image_size=64)
    patients = pd.Series([s.patient_id for s in specs])
    assert patients.value_counts().max() > 1  # several studies per patient: folds must group them
    labels = np.concatenate([s.labels() for s in specs])
    prevalence = dict(zip(LABELS, labels.mean(axis=0)))
    assert 0.11 < prevalence["any"] < 0.17
    assert all(prevalence[k] > 0.005 for k in LABELS)


@pytest.mark.parametrize("subtype", ["epidural", "intraparenchymal", "intraventricular", "subarachnoid", "subdural"])
def test_each_subtype_adds_blood_where_the_label_says(subtype):
    from dataclasses import replace

    from rsna22_utils.intracranial.synth import Bleed, render_slice

    spec = replace(make_specs(2, 0, seed=3, image_size=128)[0], bleeds=[])
    index = spec.n_slices // 2
    clean = render_slice(spec, index)
    bleeding = render_slice(replace(spec, bleeds=[Bleed(subtype, index, index, 1.0, 1.0)]), index)
    blood = (bleeding.astype(int) - clean.astype(int)) > 20
    assert blood.sum() > 20, f"{subtype}: too few blood pixels"
    assert spec.labels()[index].sum() == 0
