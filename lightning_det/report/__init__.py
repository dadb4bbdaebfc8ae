"""The results report a person looks at: per-epoch results.csv and the PNGs written beside the checkpoints, and
the box drawing shared by the image logger, the browser and predict."""
