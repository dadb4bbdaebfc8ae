"""The command-line tools: train, evaluate, predict, export, browse, convert, anchors (``python -m lightning_det.tools.<name>``)."""
