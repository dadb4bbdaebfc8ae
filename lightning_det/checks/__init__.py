"""Checks of a run's inputs before any data is read: config values (``config``) and checkpoint files (``run``)."""
