"""Which Redis errors are outages (wait, buffer, count) and which are errors (say
so): `replay_server.protocol.is_outage` on the error texts Redis and redis-py
really produce (hand-made here; the real servers' refusals are in
tests/test_replay_faults.py and tests/test_faults.py)."""

from __future__ import annotations

import pytest
import redis

from replay_server.protocol import ReplayUnavailable, is_outage, replay_errors

OUTAGES = [
    "BUSY Valkey is busy running a script. You can only call SCRIPT KILL or SHUTDOWN NOSAVE.",
    "MISCONF Errors writing to the AOF file: No space left on device",
    "NOREPLICAS Not enough good replicas to write.",
    "OOM command not allowed when used memory > 'maxmemory'.",
    # inside a pipeline, redis-py rewrites the message
    "Command # 1 (GET apex:v2:epoch) of pipeline caused error: BUSY Valkey is busy running",
    "Command # 3 (SET k v) of pipeline caused error: MISCONF Errors writing to the AOF file",
    # inside a script, the refusal is wrapped
    "Error running script (call to f_1a2b): @user_script:9: -OOM command not allowed",
]
ERRORS = [
    "WRONGTYPE Operation against a key holding the wrong kind of value",
    "BUSYKEY Target key name already exists.",
    "ERR unknown command 'FOO'",
    "NOSCRIPT No matching script. Please use EVAL.",
    "Command # 2 (HGET m x) of pipeline caused error: WRONGTYPE Operation against a key",
]


@pytest.mark.parametrize("msg", OUTAGES)
def test_refusals_that_pass_by_themselves_are_outages(msg):
    assert is_outage(redis.ResponseError(msg))
    with pytest.raises(ReplayUnavailable, match="Redis at x is unavailable"):
        with replay_errors("Redis at x"):
            raise redis.ResponseError(msg)


@pytest.mark.parametrize("msg", ERRORS)
def test_wrong_data_and_bugs_are_errors(msg):
    assert not is_outage(redis.ResponseError(msg))
    with pytest.raises(redis.ResponseError):
        with replay_errors("Redis at x"):
            raise redis.ResponseError(msg)
