"""An OpenAI-compatible HTTP server: ``rwkvkit serve --model PATH``.

One concern per module:

- ``engine``: the background thread that owns the model; interleaved prefill and batched decode.
- ``protocol``: request schemas, the RWKV chat prompt, response objects (OpenAI's shapes).
- ``errors``: ``APIError``, the one OpenAI-shaped error every refusal becomes.
- ``security``: Host / Origin / Content-Type checks, body size and time limits, the API key, and the
  uvicorn protocol that drops connections whose headers never arrive.
- ``app``: the FastAPI routes tying them together (``create_app``).
- ``cli``: ``rwkvkit serve`` (``main``) and ``make_server`` (a uvicorn server with those limits).

FastAPI and uvicorn come with ``pip install 'rwkvkit[serve]'`` and are imported only when used.
The server binds to 127.0.0.1 by default and answers only loopback Host names there.
"""

from .app import create_app
from .cli import main, make_server
from .engine import Engine, Job
from .errors import APIError
from .protocol import chat_prompt

__all__ = ["APIError", "Engine", "Job", "chat_prompt", "create_app", "main", "make_server"]
