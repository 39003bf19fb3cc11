"""The verdict engine: an anytime-valid, paired PROMOTE / REJECT / HOLD / INCONCLUSIVE decision per challenger."""
