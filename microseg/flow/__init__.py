"""Kernel records become events: drain the ring buffer, enrich with names,
number and fan out to subscribers; filters and the idle-session sweeper."""
