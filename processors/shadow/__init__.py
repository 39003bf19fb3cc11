"""The shadow worker: decodes inference events, runs the challengers on sampled requests
(:mod:`.core`), publishes their predictions (``shadowpipe worker shadow``)."""
