"""``detfocal benchmark``: detfocal's focal loss, head, training step and COCO evaluation against torchvision.

The command (:mod:`.command`: arguments, the cases to run, ``main``), the runner
(:mod:`.runner`: each batch of cases in a subprocess, their results), the report
(:mod:`.report`: markdown tables) and one module per kind of case (:mod:`.loss`,
:mod:`.training`, :mod:`.evaluation`, :mod:`.profile`, with :mod:`.timing`). The GPU check
(``--cases gpu``) runs those cases and more in steps (:mod:`.gpu`) with its own table
(:mod:`.gpu_report`).
"""
from .command import default_inputs, main

__all__ = ["default_inputs", "main"]
