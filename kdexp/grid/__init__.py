"""Grids of runs: ``kdexp sweep`` (compose, launch, summarise), packed training of many students in one
process, and the pack workers that write each packed member as the single run it stands for."""
