"""RSNA 2019 Intracranial Hemorrhage Detection on the kit's core: 2.5D triplets, a 3-window variant, five CNN
families, folds grouped by patient, TTA and slice-position smoothing (`../shared/reference/ich-2019.md`).

`stages.py` registers the pipeline with the kit's core (`rsna22_utils.core.registry`); nothing here
imports the cervical package.
"""

import os

# albumentations asks pypi.org for a newer version at import (a DNS lookup on offline Kaggle kernels).
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
