"""What a training step does beyond TorchTitan's: `trainer.MoTTrainer` (the one trainer class)
and the pieces it is built from (loss, metrics, validation, optimizer, non-finite guard,
checkpoint check). Import the modules themselves: `torchtitan_mot/__init__.py` imports the
TrainSpec builders from here while the package is still being set up."""
