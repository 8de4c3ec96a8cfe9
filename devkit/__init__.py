"""Development tooling, never installed with the package: throwaway servers for the demo,
the examples, the tests and the benchmarks (``devkit.servers``)."""
