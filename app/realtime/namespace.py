"""The Socket.IO namespace: the connect check and the rooms a socket joins.

This is the only module that turns a ``Refusal`` into a Socket.IO
CONNECT_ERROR (``errors.connect_error``: ``{"message", "data": {"code"}}``).
"""

from __future__ import annotations

import logging
from typing import Any

import socketio

from app.auth import credentials
from app.auth.checker import AuthChecker, Principal
from app.errors import Refusal, Unavailable, connect_error
from app.realtime.rooms import organization_room, user_room

log = logging.getLogger(__name__)


def refusal_to_wire(exc: Refusal) -> socketio.exceptions.ConnectionRefusedError:
    """Build the CONNECT_ERROR python-socketio sends for a refusal."""
    wire = connect_error(exc.code, exc.message)
    return socketio.exceptions.ConnectionRefusedError(wire["message"], wire["data"])


class OrgcastNamespace(socketio.Namespace):  # type: ignore[misc]
    """Authorize on connect; admit into organization.<id> and user.<user_id>."""

    def __init__(self, checker: AuthChecker, namespace: str = "/") -> None:
        super().__init__(namespace)
        self._checker = checker
        #: the principal of each connected socket, by sid
        self.principals: dict[str, Principal] = {}

    def on_connect(self, sid: str, environ: dict[str, Any], auth: Any = None) -> None:
        try:
            creds = credentials.extract(auth, environ)
            principal = self._checker.authorize(creds)
        except Refusal as exc:
            log.info("refused %s: %s", environ.get("REMOTE_ADDR", "-"), exc.code)
            raise refusal_to_wire(exc) from None
        except Exception:
            # A bug must not read as a client error: refuse as retryable.
            log.exception("connect check failed")
            raise refusal_to_wire(Unavailable()) from None
        self.principals[sid] = principal
        self.enter_room(sid, organization_room(principal.organization_id))
        self.enter_room(sid, user_room(principal.user_id))
        log.debug("admitted socket %s: user %s, organization %s", sid, principal.user_id,
                  principal.organization_id)

    def on_disconnect(self, sid: str, reason: Any = None) -> None:
        self.principals.pop(sid, None)

    def trigger_event(self, event: Any, *args: Any) -> Any:
        """Dispatch the server's own events and ours; ignore what clients invent.

        python-socketio routes a client's EVENT packet named "connect" or
        "disconnect" here too. Its own calls come while the socket is still
        connecting or already disconnecting, a client's while it is connected.
        """
        if not isinstance(event, str):
            return self.server.not_handled
        if event in ("connect", "disconnect"):
            if self.server.manager.is_connected(args[0], self.namespace):
                log.debug("ignored client event %r", event)
                return self.server.not_handled
            return super().trigger_event(event, *args)
        if event in self.client_events:
            return super().trigger_event(event, *args)
        log.debug("ignored client event %r", event[:64])
        return self.server.not_handled

    #: events a client may send (later: subscribe, unsubscribe, refresh)
    client_events: frozenset[str] = frozenset()
