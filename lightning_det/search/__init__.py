"""Many trainings at once: the Optuna search (``study``), its samplers, and the multirun summary (``sweep``, ``tables``)."""
