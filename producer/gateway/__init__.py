"""The OpenAI-compatible HTTP gateway (``ryzanstein gateway``); see docs/GATEWAY.md.

``app`` builds the Starlette application (``create_app``), ``schema`` holds the OpenAI
request/response shapes, ``errors`` maps ryzanstein error codes to HTTP, ``groups`` reads the
registry, ``config`` the options, ``cli`` the command. Nothing is imported here, so that the CLI
loads the web stack only when the gateway runs.
"""
