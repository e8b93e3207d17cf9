"""Kaggle-style image classification pipeline: folds, training, TTA, ensembling, submissions.

Run `make help` (or `python -m pipeline --help`) for the stages.
"""

__version__ = "0.2.0"
