"""An ASGI service (Starlette) that runs its scheduler only while it leads.

Every replica serves HTTP; exactly one runs the background job. Run two of them against one
etcd and kill the leader: the other takes over within the TTL.

    ELECTFSM_ENDPOINTS=127.0.0.1:2379 NODE=node-a \\
        uvicorn --app-dir examples asgi_scheduler:app --port 8001
    ELECTFSM_ENDPOINTS=127.0.0.1:2379 NODE=node-b \\
        uvicorn --app-dir examples asgi_scheduler:app --port 8002
    curl -s localhost:8001/leader

The job gets the term: it is cancelled the moment the term ends (before etcd could expire our
lease), and our key is released only after its cleanup, so two replicas' jobs never overlap.
Use ``term.token`` as the fencing token for whatever the job writes.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import AsyncIterator

import anyio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from electfsm import Term
from electfsm.aio import AsyncElector

NODE = os.environ.get("NODE", socket.gethostname())
ENDPOINTS = os.environ.get("ELECTFSM_ENDPOINTS", "127.0.0.1:2379").split(",")
ELECTION = os.environ.get("ELECTION", "examples/scheduler")
TTL = int(os.environ.get("TTL", "5"))
JOB_LOG = os.environ.get("JOB_LOG")  # where each tick of the job is written, if set


async def scheduler(term: Term) -> None:
    """The leader's job: one tick every 100 ms, each stamped with the fencing token."""
    while True:
        if JOB_LOG:
            with open(JOB_LOG, "a") as f:
                f.write(f"{NODE} {term.token} {time.time():.6f}\n")
        await anyio.sleep(0.1)


@contextlib.asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    async with AsyncElector(endpoints=ENDPOINTS, election=ELECTION, identity=NODE,
                            ttl=TTL) as elector:
        app.state.elector = elector
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(elector.run_while_leader, scheduler)
            yield
            tasks.cancel_scope.cancel()


async def leader(request: Request) -> JSONResponse:
    """Who leads, as this replica knows it."""
    elector: AsyncElector = request.app.state.elector
    info = elector.leader
    return JSONResponse({
        "node": NODE,
        "state": elector.state,
        "is_leader": elector.is_leader,
        "leader": info.identity if info is not None else None,
        "token": info.token if info is not None else None,
    })


app = Starlette(routes=[Route("/leader", leader)], lifespan=lifespan)
