"""The results report a person looks at: per-epoch results.csv and the PNGs written beside the checkpoints."""

from lightning_det.report.callback import ResultsReport
from lightning_det.report.confusion import confusion_matrix
from lightning_det.report.curves import best_f1_threshold, f1_by_threshold
from lightning_det.report.results_csv import append_row, read_rows

__all__ = ["ResultsReport", "append_row", "best_f1_threshold", "confusion_matrix", "f1_by_threshold", "read_rows"]
