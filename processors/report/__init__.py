"""``shadowpipe report``: one self-contained HTML file that leads with the verdict.

:mod:`.data` gathers everything through the read side (:mod:`shadowpipe.processors.read`,
so a running monitor is asked when it holds the embedded engine) and the verdict through
the same call as ``shadowpipe verdict``; :mod:`.figures` draws inline SVG plots;
:mod:`.page` assembles the HTML; :mod:`.commands` is the CLI.
"""
