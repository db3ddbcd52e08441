"""Everything that touches BPF: the ABI mirror of bpf/microseg.h, loading and
pinning the program, its maps and records, TC attachment, links and clocks."""
