"""Running a plan: one streaming loop (stream.py) with pluggable outputs (outputs/) and executors
(executors/), the arithmetic of one step (compute.py), and the run's options (options.py)."""
