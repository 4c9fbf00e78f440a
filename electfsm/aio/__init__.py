"""Leadership for asyncio and trio code (``pip install electfsm[aio]``).

::

    from electfsm.aio import AsyncElector

    async with AsyncElector(endpoints=["127.0.0.1:2379"], election="jobs/scheduler",
                            identity="node-a", ttl=5) as el:
        async with el.leadership() as term:     # waits until elected
            await run_scheduler(term.token)     # cancelled the moment the term ends

Built on :mod:`anyio` over the threaded :class:`electfsm.Elector`, so one facade serves both
event loops; the elector's threads never wait for the loop.
"""

from electfsm.aio.elector import AsyncElector

__all__ = ["AsyncElector"]
