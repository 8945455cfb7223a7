"""The loop's parts (annotation/run_loop.py is the command): its config schema (``config.py``), the steps, their keys
and the resumable state (``steps.py``), and the before/after report (``report.py``)."""
