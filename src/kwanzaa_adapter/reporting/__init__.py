"""The run report: one self-contained HTML page (`report.html`) of what a run trained, proved and measured."""
