"""absence-sync: HR absence events from Kafka into employees' work calendars."""

__version__ = "0.1.0"
