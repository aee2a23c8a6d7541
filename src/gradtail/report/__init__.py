"""Result tables and (later) reports."""

from gradtail.report.table import columns_for, format_table, run_rows

__all__ = ["columns_for", "format_table", "run_rows"]
