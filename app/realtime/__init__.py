"""The Socket.IO edge: the namespace, fan-out to sockets, token expiry, serving."""
