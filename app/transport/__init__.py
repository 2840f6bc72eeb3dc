"""The forked transports: WebSocket frames, Engine.IO sessions, the Socket.IO server.

What orgcast changed in python-engineio, python-socketio and
gevent-websocket, and why, is in each module's docstring. The features of
``app/realtime`` never import these modules; the namespace and fan-out
(the edges that speak Socket.IO) do.
"""
