"""The steps of `tools/gpu_check.py`, one module each; `runner.Check` is what they share (the time boxes,
the log, the results) and `report` writes what they found."""
