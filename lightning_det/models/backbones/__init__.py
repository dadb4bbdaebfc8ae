"""Feature extractors shared by the detectors."""
