"""Stage one: train a built-in backbone family from scratch (run.py) so it can be extracted like a user's
checkpoint."""
