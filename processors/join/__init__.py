"""The joiner: matches each shadow prediction with its inference and its feedback in Redis
(:mod:`.store`), emits joined records and orphans (``shadowpipe worker join``)."""
