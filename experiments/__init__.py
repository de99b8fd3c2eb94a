"""The research questions of the project: one script (``python -m experiments.run``), its configs and RESULTS.md."""
