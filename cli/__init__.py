"""The `dit-serve` command: wires the API, the workers and an embedded Redis into processes.

It sits above every other package (it may import app, worker, models and evaluation); nothing
imports it. The shared core (dit_serve/) knows nothing of it.
"""
