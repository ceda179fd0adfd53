"""``python -m controller.sandbox.apiserver``: serve an empty emulated API until killed."""

from __future__ import annotations

import asyncio

from controller.sandbox.apiserver import ApiServer


def main(argv: list[str] | None = None) -> int:
    """``python -m controller.sandbox.apiserver [--port N]``: serve an empty emulated API until killed
    (benchmarks run it in a process of its own; handy for trying clients). Prints the URL first."""
    import argparse
    import signal

    p = argparse.ArgumentParser(prog="python -m controller.sandbox.apiserver", description=main.__doc__)
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--bookmark-interval", type=float, default=5.0, help="seconds between watch BOOKMARKs")
    p.add_argument("--test-hooks", action="store_true",
                   help="serve POST /_test/{fault,clear-faults,compact,drop-watches} (chaos tests)")
    args = p.parse_args(argv)

    async def serve() -> None:
        server = ApiServer(port=args.port, bookmark_interval=args.bookmark_interval, test_hooks=args.test_hooks)
        url = await server.start()
        print(url, flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await server.stop()

    asyncio.run(serve())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
