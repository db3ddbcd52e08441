"""microseg: an event-driven, observability-first microsegmentation firewall."""

__version__ = "0.1.0"
