"""Every bpf/lib header compiles on its own: it includes what it uses, so
moving an include in bpf/microseg.bpf.c (or reusing a header in another
program) cannot break the build in a confusing place."""

from __future__ import annotations

from pathlib import Path

import pytest

from microseg.kernel.loader import DatapathConfig, bpf_source_dir, program_source

HEADERS = sorted(p.name for p in (bpf_source_dir() / "lib").glob("*.h"))


@pytest.mark.parametrize("header", HEADERS)
def test_header_compiles_alone(header: str, tmp_path: Path) -> None:
    from bcc import BPF

    entry = tmp_path / "only.bpf.c"
    entry.write_text(f'#include "{bpf_source_dir() / "lib" / header}"\n')
    cfg = DatapathConfig(pin_dir=None, session_capacity=1024, ringbuf_bytes=1 << 16)
    bpf = BPF(text=program_source(entry).encode(), cflags=cfg.cflags())
    bpf.cleanup()


def test_every_header_is_included_by_the_program() -> None:
    text = (bpf_source_dir() / "microseg.bpf.c").read_text()
    for header in HEADERS:
        if header != "proto.h":  # parse.h's own
            assert f'#include "lib/{header}"' in text, header
