"""How long gss_accept_sec_context takes, which decided that socksd runs it on a thread pool.

Against a throwaway realm (tests/krb5.py, replay cache in its temporary directory): N fresh
contexts established with mutual authentication (socksd's client and Dante's ask for it) and N
without (those go through the on-disk replay cache). Prints median, 90th percentile and maximum
of the accept call alone, and of the same call through ``GssapiAcceptor.run`` (the thread pool, as
the server does it) seen from the event loop.

    PYTHONPATH=src python3 bench/gssapi_accept.py [-n 300]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.krb5 import HOST, TestRealm


def summary(name: str, seconds: list[float]) -> str:
    ms = sorted(s * 1e3 for s in seconds)
    p90 = ms[int(len(ms) * 0.9)]
    return f"{name}: median {statistics.median(ms):.3f} ms, p90 {p90:.3f} ms, max {ms[-1]:.3f} ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=300)
    args = parser.parse_args()
    realm = TestRealm.start()
    try:
        with realm.environment():
            import gssapi

            from socksd.auth.gssapi import CLIENT_FLAGS, GssapiAcceptor

            acceptor = GssapiAcceptor("rcmd", realm.keytab)
            name = gssapi.Name(f"rcmd@{HOST}", gssapi.NameType.hostbased_service)
            no_mutual = CLIENT_FLAGS & ~gssapi.RequirementFlag.mutual_authentication
            for label, flags in (("mutual", CLIENT_FLAGS), ("no mutual (replay cache)", no_mutual)):
                tokens = [
                    gssapi.SecurityContext(name=name, usage="initiate", flags=flags).step()
                    for _ in range(args.n)
                ]
                inline = []
                for token in tokens[: args.n // 2]:
                    ctx = acceptor.new_context()
                    start = time.perf_counter()
                    ctx._step(token)
                    inline.append(time.perf_counter() - start)

                async def pooled(batch: list[bytes]) -> list[float]:
                    out = []
                    for token in batch:
                        ctx = acceptor.new_context()
                        start = time.perf_counter()
                        await ctx.step(token)
                        out.append(time.perf_counter() - start)
                    return out

                via_pool = asyncio.run(pooled(tokens[args.n // 2 :]))
                print(summary(f"{label}, inline", inline))
                print(summary(f"{label}, via the pool", via_pool))
    finally:
        realm.stop()


if __name__ == "__main__":
    main()
