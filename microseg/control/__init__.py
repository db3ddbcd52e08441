"""The daemon and how it is driven: lifecycle, the report that every view
renders, the control API over the unix socket, its client and the CLI."""
