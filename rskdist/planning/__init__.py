"""Planning a run before renting the machines: predicted memory per rank (memory.py).

This sits above the library: it builds models and reads the loss kernel's public
constants, and nothing in rskdist imports it.
"""
