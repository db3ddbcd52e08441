"""A lab of network namespaces on a bridge, with servers and traffic: the
fixture of the end-to-end tests, the benchmarks and `microseg demo`."""

DEMO_POLICY = "/tmp/microseg-demo/policy.yaml"
"""Where `microseg demo` writes its policy (here: the CLI's help names it
without importing the lab)."""
