"""The bus that carries events and controls between every worker and host.

Two operations per backend, as python-socketio's ``_publish``/``_listen``
and Centrifugo's broker have them: ``_publish(text)`` sends a message to
every process, ``_listen()`` receives in this one until its connection is
lost. ``base.Bus`` keeps the logic above them once: the reconnect loop with
backoff, the state that ``/readyz`` reports and that refuses publishes while
this process cannot hear the bus, and the decoding that no garbage survives.

Backends: ``postgres.PostgresBus`` (LISTEN/NOTIFY, the default, needing
nothing but the database) and ``redis.RedisBus`` (pub/sub, with
``REDIS_URL``). Each also receives, in one process of the deployment at a
time (the *leader*), what backends publish in the formats orgcast
understands (``pg_notify``, the Socket.IO emitters), and hands it to a
source handler: that process turns each message into one bus message, so
every event is published once whatever its path.
"""
