"""The OpenAI-compatible HTTP server: a thin adapter over the AsyncEngine.

protocol.py     request/response bodies (pydantic)
routes.py       the route table
errors.py       exceptions -> OpenAI error JSON
completions.py, chat.py   the two generation endpoints
sampling.py     request body -> prompt ids + SamplingParams (and the context-window check)
streaming.py    SSE framing, merging streams, abort on disconnect
logprobs.py     engine logprobs -> OpenAI's two logprobs shapes
metrics.py      Prometheus metrics (tokenmill: prefix)
middleware.py   API key and body-size guards
"""

from tokenmill.server.app import create_app
from tokenmill.server.state import ServerConfig

__all__ = ["ServerConfig", "create_app"]
