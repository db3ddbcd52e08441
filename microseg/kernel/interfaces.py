"""Which interfaces the datapath is attached to: names and shell-style globs
(`veth*`, `msd-*`), matched against the host's links whenever they change.

`sync()` attaches to every matching link not yet attached and forgets links
that vanished (the kernel drops their filters with them). It blocks (netlink),
so the daemon runs it in a worker thread.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import threading
from dataclasses import dataclass

log = logging.getLogger("microseg.interfaces")

SYS_NET = "/sys/class/net"

# Link types (ARPHRD_*, /sys/class/net/NAME/type) by the header a packet
# starts with at the TC hooks. Any other type is refused at attach time:
# a program that cannot parse a link's packets must never pass them
# unjudged (docs/how-it-works.md).
ETHERNET_LINKS = {1: "ether", 772: "loopback"}
L3_LINKS = {65534: "none", 519: "rawip", 768: "ipip", 769: "ip6tnl", 776: "sit",
            778: "gre", 823: "ip6gre"}


def link_type(name: str) -> int | None:
    try:
        with open(os.path.join(SYS_NET, name, "type")) as f:
            return int(f.read())
    except (OSError, ValueError):
        return None


def current_links() -> dict[int, str]:
    """ifindex -> name of the links in this network namespace."""
    out = {}
    try:
        names = os.listdir(SYS_NET)
    except OSError:
        return out
    for name in names:
        try:
            with open(os.path.join(SYS_NET, name, "ifindex")) as f:
                out[int(f.read())] = name
        except (OSError, ValueError):
            continue  # vanished between listdir and open
    return out


@dataclass
class Attached:
    name: str
    created_clsact: bool
    l3: bool = False  # no link-layer header: the _l3 entry points


class InterfaceManager:
    def __init__(self, datapath, patterns: list[str]) -> None:
        self.datapath = datapath
        self.patterns = patterns
        self.attached: dict[int, Attached] = {}
        self.failed: dict[str, str] = {}  # name -> why, for status
        self._names: dict[int, str] = {}
        self._lock = threading.Lock()
        # Set by detach_all (the daemon is stopping): a link resync still
        # running in a worker thread must not attach anything after it.
        self._closed = False

    def matches(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, p) for p in self.patterns)

    def sync(self) -> tuple[list[str], list[str]]:
        """Attach new matching links, forget vanished ones: (added, removed)."""
        with self._lock:
            if self._closed:
                return [], []
            links = current_links()
            self._names = links
            present = set(links.values())
            for name in [n for n in self.failed if n not in present]:
                del self.failed[name]  # gone: nothing to report any more
            added, removed = [], []
            for idx in list(self.attached):
                if idx not in links or links[idx] != self.attached[idx].name:
                    removed.append(self.attached.pop(idx).name)
            for idx, name in sorted(links.items()):
                if idx in self.attached or not self.matches(name):
                    continue
                kind = link_type(name)
                if kind not in ETHERNET_LINKS and kind not in L3_LINKS:
                    why = (f"link type {kind} (ARPHRD): its packets' header cannot be "
                           "parsed; not attached" if kind is not None
                           else "link type unknown; not attached")
                    if self.failed.get(name) != why:
                        log.error("interface %s refused: %s", name, why)
                    self.failed[name] = why
                    continue
                l3 = kind in L3_LINKS
                try:
                    a = self.datapath.attach(idx, l3=l3)
                except Exception as e:  # netlink errors come in many kinds
                    self.failed[name] = str(e)
                    log.error("attach %s failed: %s", name, e)
                    # One hook may be attached: never leave half of it behind.
                    try:
                        self.datapath.detach(idx, remove_clsact=False)
                    except Exception as e2:
                        log.error("removing what was attached to %s failed: %s", name, e2)
                    continue
                self.failed.pop(name, None)
                self.attached[idx] = Attached(name, a.created_clsact, l3)
                added.append(name)
            for name in added:
                a = next(x for x in self.attached.values() if x.name == name)
                log.info("attached interface=%s%s", name,
                         " (no link-layer header: parsed from the IP header)" if a.l3 else "")
            for name in removed:
                log.info("interface gone interface=%s", name)
            return added, removed

    def missing(self) -> list[str]:
        """Exact names asked for that do not exist (globs may match later)."""
        names = {a.name for a in self.attached.values()}
        return [p for p in self.patterns
                if not any(c in p for c in "*?[") and p not in names]

    def detach_all(self) -> None:
        with self._lock:
            self._closed = True
            for idx, a in list(self.attached.items()):
                try:
                    self.datapath.detach(idx, remove_clsact=a.created_clsact)
                    log.info("detached interface=%s", a.name)
                except Exception as e:
                    log.error("detach %s failed: %s", a.name, e)
            self.attached.clear()

    def name_of(self, ifindex: int) -> str | None:
        """The name of an interface events come from (attached ones, or any
        link seen at the last sync)."""
        a = self.attached.get(ifindex)
        return a.name if a is not None else self._names.get(ifindex)
