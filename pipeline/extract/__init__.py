"""Phase one: run a frozen backbone once over a dataset and write its outputs into a cache store
(run.py), reading the user's checkpoint strictly (checkpoint.py, hf.py), on one process or under torchrun
(distributed.py)."""
