"""Where and how a command runs: processes under torchrun (distributed.py), CPU threads
(threads.py) and the device (devices.py).

Layer: imports ``meanflow.errors`` only.
"""
