"""`specedge serve`: an OpenAI-compatible HTTP server on loopback, decoding edge-assisted.

openai_api.py   the requests it reads (checked into dataclasses) and the answers it writes
tools.py        function calling: the tools a request offers, the calls read out of a reply
responses_api.py  /v1/responses read as a chat request; its response object and event stream
reply_text.py   reply text as tokens arrive: whole characters, cut at stop sequences
slots.py        drafting contexts (draft engine + hub session), matched to requests by prefix;
                a chat's replies as the model wrote them, fill-in-the-middle prompts
layout.py       a chat sent back whole, laid out as turns in one render of the chat template
http.py         routes (starlette), SSE, API key; decoding on threads, off the event loop
connections.py  uvicorn's h11 protocol with request deadlines, a connection cap, OpenAI-shaped refusals
"""
