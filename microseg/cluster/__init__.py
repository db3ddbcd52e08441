"""Many hosts: this node's identities and the cluster policy shared through
etcd (docs/many-hosts.md) — the etcd client, and the node that publishes
and watches."""
