"""A lab of network namespaces on a bridge, with servers and traffic: the
fixture of the end-to-end tests, the benchmarks and `microseg demo`."""
