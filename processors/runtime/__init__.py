"""The worker runtime every processor shares: one message type (:mod:`.message`), one
retry/backoff helper (:mod:`.retry`), one batch loop (:mod:`.loop`: consume a micro-batch,
process, publish, flush, commit; :mod:`.thread` runs it on its own thread of the Faust
worker) and one health surface (:mod:`.health`: ``/shadowpipe/<worker>/ready`` and
``/shadowpipe/<worker>/stats`` on the web port)."""
