"""The verdict engine: a paired, anytime-valid PROMOTE/REJECT/HOLD/INCONCLUSIVE per challenger."""
