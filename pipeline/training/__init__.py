"""Training, in parts: what a run is built from (parts.py), the loop (loop.py), its checkpoints
(checkpoints.py), training one run folder (run.py) and an experiment's folds (experiment.py)."""
