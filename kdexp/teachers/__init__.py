"""Teachers: where a run's teacher comes from (a checkpoint, the train-once cache, a chain of assistants,
a predictions file) and its outputs (online, cached, predicted). Loads and judges teachers; trains none
(a teacher that must be trained is trained as a run, by :mod:`kdexp.run.teacher`)."""
