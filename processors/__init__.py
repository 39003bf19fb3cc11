"""Faust workers: ``shadow`` (challengers) -> ``join`` (Redis state) -> ``monitor`` (ClickHouse)."""
