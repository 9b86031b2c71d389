"""An LLM-style token streamer over Server-Sent Events, for every sender.

Run it::

    fdhandoff serve examples.sse_tokens:handler --interface handoff \\
        --bind unix-seqpacket:/run/llm/apache.sock --bind unix:/run/llm/front.sock

* Behind Apache ``mod_socket_handoff`` (SEQPACKET): the application's
  ``X-Handoff-Data`` JSON arrives unchanged as the payload, e.g.
  ``{"user_id":12345,"prompt":"hi","uri":"/handoff.php?prompt=hi","method":"GET"}``;
  the prompt is its ``prompt``.
* Behind the fdhandoff front or nginx ``fd_pass`` (SCGI): the prompt is the
  ``prompt`` query parameter (``GET /chat?prompt=hi``); a JSON payload the
  front forwards in ``HANDOFF_DATA`` is honoured the same way as Apache's.

The answer has the shape Apache's example daemons send, so their browser
code works unchanged: ``data: {"content": "..."}`` per token, then
``data: [DONE]``.  The "model" is a stand-in that streams a canned reply with
a delay per token (``SSE_TOKENS_DELAY`` seconds, default 0.05); replace
:func:`generate` with a real model client.  A client that leaves stops its
generation at the next token.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import parse_qs

from fdhandoff.receiver import ConnectionClosed, Handoff

log = logging.getLogger("examples.sse_tokens")

#: Seconds between tokens of the stand-in model.
DELAY = float(os.environ.get("SSE_TOKENS_DELAY", "0.05"))

#: Longest prompt accepted (characters); longer ones get 413.
MAX_PROMPT = 4096


async def generate(prompt: str) -> AsyncIterator[str]:
    """Stand-in for a model: a reply about the prompt, one word at a time."""
    reply = f"You asked: {prompt}. Here is a streamed answer, one token at a time."
    for word in reply.split(" "):
        await asyncio.sleep(DELAY)
        yield word + " "


def _request_fields(handoff: Handoff) -> dict[str, Any] | None:
    """The JSON payload (Apache, or HANDOFF_DATA from the front), if any."""
    if not handoff.payload:
        return None
    try:
        fields = json.loads(handoff.payload)
    except ValueError:
        return None
    return fields if isinstance(fields, dict) else None


def prompt_of(handoff: Handoff) -> tuple[str | None, Any]:
    """(prompt, user id) from the payload, else from the query string."""
    fields = _request_fields(handoff)
    if fields is not None:
        prompt = fields.get("prompt")
        return (prompt if isinstance(prompt, str) else None), fields.get("user_id")
    query = parse_qs(handoff.query_string.decode("latin-1"))
    values = query.get("prompt")
    return (values[0] if values else None), None


async def handler(handoff: Handoff) -> None:
    if handoff.payload and _request_fields(handoff) is None:
        await handoff.respond(400, [("Content-Type", "text/plain")], b"payload is not JSON\n")
        return
    prompt, user = prompt_of(handoff)
    if not prompt:
        await handoff.respond(400, [("Content-Type", "text/plain")], b"no prompt\n")
        return
    if len(prompt) > MAX_PROMPT:
        await handoff.respond(413, [("Content-Type", "text/plain")], b"prompt too long\n")
        return
    stream = await handoff.sse()
    log.info("streaming for user %s (%d-character prompt)", user, len(prompt))
    try:
        async for token in generate(prompt):
            await stream.send(json.dumps({"content": token}))
        await stream.send("[DONE]")
    except ConnectionClosed:
        log.info("client of user %s left; generation stopped", user)
    finally:
        stream.close()
