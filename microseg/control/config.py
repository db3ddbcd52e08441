"""What `microseg run` is asked to do: the daemon's configuration."""

from __future__ import annotations

import socket
from dataclasses import dataclass, field

from microseg.control.client import DEFAULT_SOCKET
from microseg.flow.sweeper import DEFAULT_TIMEOUTS
from microseg.kernel.loader import DEFAULT_PIN_DIR

DEFAULT_POLICY = "/etc/microseg/policy.yaml"


@dataclass
class EtcdConfig:
    """`run --etcd ...` (docs/many-hosts.md)."""

    endpoints: list[str]
    node: str = ""             # "": the host name
    prefix: str = "/microseg/"
    ttl: int = 30
    cacert: str | None = None
    cert: str | None = None
    key: str | None = None

    def node_name(self) -> str:
        return self.node or socket.gethostname().split(".")[0]


@dataclass
class RunConfig:
    interfaces: list[str] = field(default_factory=list)
    policy_path: str = DEFAULT_POLICY
    policy_default_audit: bool = False
    insecure_policy_permissions: bool = False
    socket_path: str = DEFAULT_SOCKET
    socket_group: str | None = None
    pin_dir: str = DEFAULT_PIN_DIR
    keep_on_exit: bool = False
    session_capacity: int = 1 << 20
    ringbuf_bytes: int = 16 << 20
    flow_log: str | None = None
    flow_log_max_bytes: int = 100 << 20
    flow_log_keep: int = 5
    timeouts: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_TIMEOUTS))
    sweep_interval: float = 5.0
    # Repeated denials/drops of one flow within this window are one event
    # (bpf/lib/aggregate.h); 0 turns aggregation off.
    event_window: float = 1.0
    # The kernel's BPF run-time statistics: WINDOW/PERIOD seconds (sampled),
    # "on" or "off" (microseg/control/runstats.py).
    run_time_stats: str = "1/15"
    metrics: tuple[str, int] | None = ("127.0.0.1", 9750)  # None: no metrics listener
    etcd: EtcdConfig | None = None  # `--etcd`: many hosts (docs/many-hosts.md)
