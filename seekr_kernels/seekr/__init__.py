"""SEEKR, the method: what any training loop drives.

Config, the recipe object (begin task, replay loss, end task, state), the replay stream
(schedule + the one interleaver + its resume point), the replay memory, importance, head
selection, losses, the pre-task snapshot and the distributed hooks. Nothing here knows of a
run directory, a command line or YAML: that is :mod:`seekr_kernels.run`.
"""
