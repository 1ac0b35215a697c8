"""Benchmarks of socketengine against its anchors (pyzmq, raw TCP sockets).

Run ``python -m bench --help`` from the repository root.  See bench/README.md.
"""
