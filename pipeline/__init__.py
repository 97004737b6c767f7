"""The detection library: no Kafka in here."""
