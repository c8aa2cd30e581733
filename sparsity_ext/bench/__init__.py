"""`sparsity-ext bench`: every sparsity_ext op on every backend available for the device, at several sizes,
against the natural torch baselines and the measured copy-bandwidth floor; writes JSON, markdown and PNG plots.

    sparsity-ext bench [--device cpu|cuda] [--quick] [--out DIR]

measure: the timing, memory and bandwidth helpers every benchmark shares; cases: what is measured;
suite: running it and the report; plots: the PNGs (matplotlib, optional); command: the CLI subcommand.
"""
