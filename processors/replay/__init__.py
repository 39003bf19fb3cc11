"""``shadowpipe replay``: stored traffic re-scored through a challenger that was not running
when it arrived, with the shadow worker's own scoring, into a replay run's database."""
