"""The ground floor: config access, run records, files, errors, vocabulary, console, W&B tracking, tasks and
processes. Nothing here imports any other part of kdexp."""
