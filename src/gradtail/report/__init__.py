"""Reports: result tables (:mod:`~gradtail.report.table`), aggregation over seeds, figures, and one
report module per task (:mod:`~gradtail.report.classification`, :mod:`~gradtail.report.segmentation`,
:mod:`~gradtail.report.detection`) on a shared page (:mod:`~gradtail.report.page`)."""

from gradtail.report.table import format_table, run_rows

__all__ = ["format_table", "run_rows"]
