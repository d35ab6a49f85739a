"""Studies that train and test several runs through the real CLI: cross-subject transfer, bottleneck width."""
