"""RSNA 2022 Cervical Spine Fracture Detection, the 3rd place's design: everything that names C1-C7 or this competition.

`stages.py` registers the pipeline with the kit's core (`rsna22_utils.core.registry`).
"""

import os

# albumentations (imported by data.py) asks pypi.org for a newer version at import: a DNS lookup
# with a 2 s timeout and a warning on Kaggle's offline kernels. The kit never wants it.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
