"""Learning curves: fine-tune on nested doubling subsets, fit held-out error against the number
of examples n, and predict the n a target error needs (`fit.py`), with an SVG picture (`plot.py`).
"""
