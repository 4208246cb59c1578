"""Target kinds, shared by labels, the probe grid and interventions.

A binary target (a mask) is fitted by a logistic probe and scored by Dice; a continuous
one (a z-scored map such as depth) by ridge regression and RMSE.
"""

BINARY, CONTINUOUS = "binary", "continuous"
KINDS = (BINARY, CONTINUOUS)
