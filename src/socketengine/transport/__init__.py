"""Transports that carry socketengine frames.  TCP lives in the endpoint core; see :mod:`.nats`."""
