"""Attach and detach the datapath at an interface's clsact hooks (pyroute2).

Filters are installed with ``replace-filter`` at a fixed (parent, prio,
handle): attaching over an older microseg program swaps it atomically, with
no window in which the interface runs unfiltered.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

ETH_P_ALL = 0x0003
PARENT_INGRESS = "ffff:fff2"
PARENT_EGRESS = "ffff:fff3"
_PARENT_IDS = {PARENT_INGRESS: 0xFFFFFFF2, PARENT_EGRESS: 0xFFFFFFF3}
FILTER_PRIO = 1
FILTER_HANDLE = ":1"
FILTER_NAME = "microseg"


@dataclass(frozen=True)
class Attachment:
    ifindex: int
    created_clsact: bool  # we added the qdisc, so detaching may remove it


def _filters(ipr: IPRoute, ifindex: int, parent: str) -> list:
    """Real filters under a hook (pyroute2 also lists the chain headers)."""
    return [m for m in ipr.get_filters(ifindex, parent=_PARENT_IDS[parent])
            if m.get_attr("TCA_OPTIONS") is not None]


def is_attached(ipr: IPRoute, ifindex: int) -> bool:
    """Both hooks carry a microseg filter."""
    try:
        return all(
            any(m.get_nested("TCA_OPTIONS", "TCA_BPF_NAME") == FILTER_NAME
                for m in _filters(ipr, ifindex, parent))
            for parent in (PARENT_INGRESS, PARENT_EGRESS))
    except NetlinkError:
        return False


def attach(ipr: IPRoute, ifindex: int, ingress_fd: int, egress_fd: int) -> Attachment:
    """Install (or atomically replace) the ingress and egress programs."""
    created = True
    try:
        ipr.tc("add", "clsact", ifindex)
    except NetlinkError as e:
        if e.code != errno.EEXIST:
            raise
        created = False
    for parent, fd in ((PARENT_INGRESS, ingress_fd), (PARENT_EGRESS, egress_fd)):
        ipr.tc("replace-filter", "bpf", ifindex, FILTER_HANDLE, fd=fd, name=FILTER_NAME,
               parent=parent, prio=FILTER_PRIO, protocol=ETH_P_ALL, classid=1,
               direct_action=True)
    return Attachment(ifindex, created)


def detach(ipr: IPRoute, ifindex: int, *, remove_clsact: bool = True) -> None:
    """Remove our filters; remove the clsact qdisc too when nothing else
    hangs off it. A vanished interface is not an error."""
    try:
        for parent in (PARENT_INGRESS, PARENT_EGRESS):
            try:
                ipr.tc("del-filter", "bpf", ifindex, FILTER_HANDLE, parent=parent,
                       prio=FILTER_PRIO, protocol=ETH_P_ALL)
            except NetlinkError as e:
                if e.code not in (errno.ENOENT, errno.EINVAL):
                    raise
        if remove_clsact and not any(_filters(ipr, ifindex, p)
                                     for p in (PARENT_INGRESS, PARENT_EGRESS)):
            ipr.tc("del", "clsact", ifindex)
    except NetlinkError as e:
        if e.code not in (errno.ENODEV, errno.ENOENT, errno.EINVAL):
            raise
