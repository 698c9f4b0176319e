"""`specedge serve`: an OpenAI-compatible HTTP server on loopback, decoding edge-assisted.

openai_api.py   the requests it reads (checked into dataclasses) and the answers it writes
reply_text.py   reply text as tokens arrive: whole characters, cut at stop sequences
slots.py        drafting contexts (draft engine + hub session), matched to requests by prefix
http.py         the standard library's threading HTTP server: routes, SSE, API key
"""
