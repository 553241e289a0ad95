"""The paper's depth study: a plan of cells (plan.py), two executors (local.py, slurm.py) and the
report (report.py). Every module here imports only the plan from this package."""
