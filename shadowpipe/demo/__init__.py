"""``shadowpipe demo``: a realistic shadow evaluation end to end on the embedded stack."""
