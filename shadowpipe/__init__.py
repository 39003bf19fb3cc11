"""shadowpipe: shadow-mode evaluation of ML models on Kafka.

Data flows through the top-level folders in order: ``producers`` (emit from the production
service) -> ``processors`` (shadow scoring, joining, monitoring) -> ClickHouse and alerts.
This package holds what they share: configuration, CLI, clients and the embedded stack.
"""

__version__ = "0.1.0"
