"""Ray pipelines around :mod:`splitnet`: data (Ray Data), stages (Ray Train), serving (Ray Serve), CLI.

Imports of Ray happen inside the commands that need it, so ``splitnet plan`` stays fast.
"""
