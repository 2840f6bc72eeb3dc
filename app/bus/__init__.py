"""The bus that carries events and controls between every worker and host.

Its concerns are the small interfaces of ``ports.py``: a **log** that every
worker reads from its cursor (publications, kicks, revocations, member
changes, each with its position), **signals** between the workers
(heartbeats and questions, best effort), the rooms' **history**, the
**sessions** a recovery needs, and the **presence** store. ``listener.py``
keeps the logic above each backend's listening connection once: the
reconnect loop with backoff, the cursor, the epoch, and the decoding that
no garbage survives.

Backends: ``postgres.py`` + ``postgres_store.py`` (the default, needing
nothing but the database) and ``redis.py`` + ``redis_store.py`` (with
``REDIS_URL``). Each also hears, in one process of the deployment at a time
(the *leader*), what backends publish in the formats orgcast understands
(``pg_notify``, the Socket.IO emitters), and hands it to a source handler:
that process appends each message to the log once, whatever its path.
"""
