"""RSNA 2022 Cervical Spine Fracture Detection, the 3rd place's design: everything that names C1-C7 or this competition.

`stages.py` registers the pipeline with the kit's core (`rsna22_utils.core.registry`).
"""
