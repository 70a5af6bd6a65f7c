"""`broker bench`: DESIGN.md §14 measured end to end (runner.py), its worker
processes (worker.py) and the nginx + nchan reference (nchan.py)."""
