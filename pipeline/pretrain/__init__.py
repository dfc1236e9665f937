"""Stage one: train a built-in backbone family from scratch so it can be extracted like a user's checkpoint.
run.py writes the checkpoint; <family>.py holds each family's training loop (its record names it)."""
