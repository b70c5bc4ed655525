"""Training and running detectors: the loop (:func:`detfocal.engine.train.train`), precision,
optimizer and schedule, checkpoints, distributed setup and run logs."""
