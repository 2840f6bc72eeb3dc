"""Engine.IO session ids (app/transport/engine.py's generate_id: python-engineio's
format, unique, never shared by a forked process) and app/process.py's cached id."""

from __future__ import annotations

import base64
import os
import re

from app.transport.engine import EngineServer

ID = re.compile(r"[A-Za-z0-9_-]{20}")


def test_ids_have_engineio_s_form_and_are_unique() -> None:
    server = EngineServer(async_mode="threading")
    ids = [server.generate_id() for _ in range(3000)]  # several refills of the read-ahead
    assert all(ID.fullmatch(i) for i in ids)
    assert len(set(ids)) == len(ids)
    raw = [base64.b64decode(i.replace("_", "/").replace("-", "+")) for i in ids[:3]]
    assert [int.from_bytes(r[12:], "big") for r in raw] == [0, 1, 2]  # the sequence, as engineio's


def test_a_forked_process_does_not_reuse_the_parent_s_random_bytes() -> None:
    server = EngineServer(async_mode="threading")
    server.generate_id()  # bytes read ahead now
    read, write = os.pipe()
    child = os.fork()
    if child == 0:
        os.write(write, server.generate_id().encode())
        os._exit(0)
    os.close(write)
    os.waitpid(child, 0)
    theirs = os.read(read, 64).decode()
    os.close(read)
    mine = server.generate_id()
    assert theirs[:16] != mine[:16]  # the random part (the sequence is the same)


def test_random_bytes_are_not_shared_with_a_forked_process() -> None:
    from app import process

    process.random_bytes(16)  # bytes read ahead now
    read, write = os.pipe()
    child = os.fork()
    if child == 0:
        os.write(write, process.random_bytes(16))
        os._exit(0)
    os.close(write)
    os.waitpid(child, 0)
    theirs = os.read(read, 64)
    os.close(read)
    assert len(theirs) == 16 and theirs != process.random_bytes(16)
    assert len({process.random_bytes(12) for _ in range(2000)}) == 2000  # across refills too


def test_the_cached_process_id_is_the_child_s_after_a_fork() -> None:
    from app import process

    assert process.pid() == os.getpid()
    read, write = os.pipe()
    child = os.fork()
    if child == 0:
        os.write(write, str(process.pid()).encode())
        os._exit(0)
    os.close(write)
    os.waitpid(child, 0)
    reported = int(os.read(read, 64))
    os.close(read)
    assert reported == child
    assert process.pid() == os.getpid()
