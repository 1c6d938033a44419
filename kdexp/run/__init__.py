"""One run, start to finish: validation, the run folder, the run lifecycle (claim, record, W&B, announce),
the Lightning engine, metrics, seeding, prediction and export.

Import-free on purpose: a pack worker imports parts of it and must never load Lightning."""
