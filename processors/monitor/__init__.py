"""The monitor: writes joined records to ClickHouse (:mod:`.sink`), windows, drift detection
and alerts (:mod:`.core`), hosts the verdict agent (``shadowpipe worker monitor``)."""
