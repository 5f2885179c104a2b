"""The serving router (`quantrol-worker route`): an OpenAI-compatible front for the stable and candidate arms.

Layout: the pure parts (`config`, `split`, `compare`, `admission`) import only pydantic and the standard library, so
the operator and every worker image can import them; `app` (aiohttp) and `metrics` (prometheus_client) are the thin
server and only exist where the serving image installs those.
"""
