"""The web view: a live page, `/metrics` for Prometheus, run control with a token.

Importing this package costs nothing; `daqd.web.app` (aiohttp, prometheus_client) is loaded only
by a daemon whose [daemon] table sets `http`.
"""
