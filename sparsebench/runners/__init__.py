"""Job runners: the pipeline of one run (stages), suites and sweeps, the speedup table."""
