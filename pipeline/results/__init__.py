"""What runs leave behind and how they are compared: run records and the leaderboard (records.py), metrics
(metrics.py, object_metrics.py), statistics (stats.py, compare.py), the HTML report (report.py,
report_stats.py), MLflow export and the one text-table printer (table.py)."""
