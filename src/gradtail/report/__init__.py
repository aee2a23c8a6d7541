"""Result tables and (later) reports."""

from gradtail.report.table import format_table, run_rows

__all__ = ["format_table", "run_rows"]
