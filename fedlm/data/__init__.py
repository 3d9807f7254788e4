"""The data pipeline, one job per module: sources.py reads text (the registry of `dataset.source` readers,
torch-free, so a device checks its data without loading torch), partitioning.py splits a corpus among clients,
packing.py turns text into token rows, preparation.py prepares a federation's or a device's data.

Import from the modules themselves: this package's __init__ stays empty so that importing sources.py loads no
torch."""
