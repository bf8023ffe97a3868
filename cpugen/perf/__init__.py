"""Measuring it: FLOPs, the machine's limits, the run record and its views, sweeps, the nightly history, the batch probe."""
