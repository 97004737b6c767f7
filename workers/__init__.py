"""Processes that move data between Kafka and pipeline/, and the command line."""
