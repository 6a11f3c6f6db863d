"""Backends written in Python, driven by the Rust model task.

Pass an instance as ``backend=`` to :meth:`erllama.Engine.load_model`. See
:class:`erllama.backends.stub.StubBackend` for the protocol.
"""

from erllama.backends.stub import StubBackend, StubContext

__all__ = ["StubBackend", "StubContext"]
