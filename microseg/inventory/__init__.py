"""Workloads from where they run: sources that follow a container engine and
report each running container's name, labels and addresses as they change."""
