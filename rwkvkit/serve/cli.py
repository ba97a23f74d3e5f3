"""``rwkvkit serve``: load a model and serve it with uvicorn, with the server's protective limits.

``make_server`` is the one place that builds the uvicorn server: h11 with a deadline for request
headers (``security.guarded_protocol``), uvicorn's keep-alive timeout for idle connections between
requests, and the app's own body deadline; tests and benchmarks use it too.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import torch

from ..model_args import add_model_args, load_model_and_tokenizer
from ..runtime import freeze_gc
from .app import BODY_TIMEOUT_S, MAX_LOGPROBS, _require_serve_deps, create_app
from .engine import BURST_MS, CACHE_BYTES, CACHE_ENTRIES, RIDE_TOKENS
from .security import LOOPBACK_HOSTS, allowed_hosts_for, check_api_key, guarded_protocol

HEADER_TIMEOUT_S = 10.0
KEEP_ALIVE_S = 5


def make_server(app: Any, host: str = "127.0.0.1", port: int = 8000, *, header_timeout: float = HEADER_TIMEOUT_S,
                log_level: str = "info") -> Any:  # fmt: skip
    """A ``uvicorn.Server`` for ``app`` whose connections must send each request's headers within
    ``header_timeout`` seconds and are closed after ``KEEP_ALIVE_S`` idle seconds between requests."""
    import uvicorn

    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, http=guarded_protocol(header_timeout),
                            timeout_keep_alive=KEEP_ALIVE_S, lifespan="on")  # fmt: skip
    return uvicorn.Server(config)


def main(argv: list[str] | None = None) -> int:
    """``rwkvkit serve --model PATH``: serve a model over an OpenAI-compatible HTTP API."""
    p = argparse.ArgumentParser(prog="rwkvkit serve", description=main.__doc__)
    add_model_args(p)
    p.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)"
    )
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1 endpoints")
    p.add_argument("--model-name", default=None, help="the id /v1/models reports (default: the file name)")
    p.add_argument("--max-batch", type=int, default=16, help="rows decoded together per step")
    p.add_argument("--max-tokens-limit", type=int, default=4096, help="largest max_tokens a request may ask")
    p.add_argument("--max-prompt-tokens", type=int, default=8192, help="longest prompt accepted, in tokens")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting beyond the batch before 429")
    p.add_argument("--prefill-slice", type=int, default=32,
                   help="prompt tokens fed per decode step while other requests stream (bounds their token gap)")  # fmt: skip
    p.add_argument("--ride-tokens", type=int, default=RIDE_TOKENS,
                   help="while requests stream, prompts with at most this many tokens left are fed through the "
                   "decode step, a token per step, instead of a separate prefill (0: never)")  # fmt: skip
    p.add_argument("--burst-ms", type=float, default=BURST_MS,
                   help="an idle server woken by a request keeps admitting requests that follow within this "
                   "many ms (8 gaps at most), to prefill a burst's short prompts together (0: never wait)")  # fmt: skip
    p.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                   help="a browser origin allowed to call the API, e.g. http://localhost:3000 (repeatable; none by default)")  # fmt: skip
    p.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                   help="another Host name to answer (default: the bound address and loopback names)")  # fmt: skip
    p.add_argument(
        "--header-timeout", type=float, default=HEADER_TIMEOUT_S, help="seconds to send request headers"
    )
    p.add_argument(
        "--body-timeout", type=float, default=BODY_TIMEOUT_S, help="seconds to send a request body"
    )
    p.add_argument("--max-logprobs", type=int, default=MAX_LOGPROBS,
                   help="most alternatives per token a request may ask (completions' logprobs, chat's top_logprobs)")  # fmt: skip
    p.add_argument("--cache-entries", type=int, default=CACHE_ENTRIES,
                   help="states kept after prompts and chat replies (a chat's next turn starts from one)")  # fmt: skip
    p.add_argument(
        "--cache-mb", type=int, default=CACHE_BYTES >> 20, help="memory those states may take, in MiB"
    )
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    args = p.parse_args(argv)
    for name in ("max_batch", "max_tokens_limit", "max_prompt_tokens", "max_queue", "prefill_slice",
                 "cache_entries", "cache_mb"):  # fmt: skip
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive")
    for name in ("max_logprobs", "ride_tokens", "burst_ms"):
        if getattr(args, name) < 0:
            p.error(f"--{name.replace('_', '-')} must be >= 0")
    if args.threads < 0:
        p.error("--threads must be >= 0 (0: torch's default)")
    if not 0 <= args.port <= 65535:
        p.error(f"--port must be in 0..65535, got {args.port}")
    if args.header_timeout <= 0 or args.body_timeout <= 0:
        p.error("--header-timeout and --body-timeout must be positive")
    try:
        check_api_key(args.api_key)
    except ValueError as e:
        p.error(str(e))
    _require_serve_deps()
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    from ..hub import ModelNotFound

    try:
        model, tok, path = load_model_and_tokenizer(args)
    except (ModelNotFound, ValueError, OSError) as e:
        print(f"rwkvkit serve: {e}", file=sys.stderr)
        return 2
    if args.host.strip("[]") not in LOOPBACK_HOSTS and args.api_key is None:
        print(f"rwkvkit serve: warning: listening on {args.host} without --api-key: anyone who can reach "
              "this address can use the model", file=sys.stderr)  # fmt: skip
    app = create_app(model, tok, model_name=args.model_name or path.stem, api_key=args.api_key,
                     max_batch=args.max_batch, max_tokens_limit=args.max_tokens_limit,
                     max_prompt_tokens=args.max_prompt_tokens, max_queue=args.max_queue,
                     prefill_slice=args.prefill_slice, ride_tokens=args.ride_tokens, burst_ms=args.burst_ms, allowed_hosts=allowed_hosts_for(args.host, args.allowed_host),
                     cors_origins=args.cors_origin, body_timeout=args.body_timeout, max_logprobs=args.max_logprobs,
                     cache_entries=args.cache_entries, cache_bytes=args.cache_mb << 20)  # fmt: skip
    freeze_gc()  # the model and the app live as long as the process (rwkvkit.runtime)
    make_server(app, args.host, args.port, header_timeout=args.header_timeout).run()
    return 0
