"""The built-in demo (run.py) and its side-by-side speed measurement (speed.py)."""
