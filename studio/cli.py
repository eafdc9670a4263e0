"""The `studio` command: the same lanes and measurements as the app, from a terminal.

Depends on the studio core (and on the UI only for `serve`).
"""

from __future__ import annotations

import argparse
import sys

import torch


def cmd_backends(args) -> int:
    from studio import backends

    device = torch.device(args.device) if args.device else backends.default_device()
    dtype = getattr(torch, args.dtype) if args.dtype else None
    infos = backends.available(device, dtype)
    width = max(len(b.name) for b in infos)
    for b in infos:
        status = "yes" if b.available else f"no: {b.reason}"
        print(f"{b.kind:<9} {b.name:<{width}}  {status}")
    return 0


def cmd_serve(args) -> int:
    from studio.ui import build_app

    build_app().queue(default_concurrency_limit=2).launch(server_name=args.host, server_port=args.port)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="studio", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("backends", help="list the attention and precision backends and whether each runs here")
    p.add_argument("--device", help="cpu or cuda (default: cuda when present)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="default: the device's usual dtype")
    p.set_defaults(run=cmd_backends)

    p = commands.add_parser("serve", help="launch the Gradio app")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=7860)
    p.set_defaults(run=cmd_serve)

    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
