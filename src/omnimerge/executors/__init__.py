"""Executors other than the local one: where a plan's output shards are computed and written."""
