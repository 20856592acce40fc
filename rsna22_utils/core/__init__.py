"""The kit's core: DICOM reading, study cache, configs, stage registry and run folders, trainer,
papermill runner, notebook tools and Kaggle delivery. It imports no competition: a competition
package registers its stages, and `core.registry.select_competition` chooses the one the kit runs.
"""
