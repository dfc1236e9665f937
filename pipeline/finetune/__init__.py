"""Phase three: fine-tune a backbone + head from a cached-head run (strategies.py, fit.py), export them as
one inference model (export.py) and predict with it (predict.py)."""
