"""What a run folder shows: grids, report.html, intermediate strips, verify, status."""
