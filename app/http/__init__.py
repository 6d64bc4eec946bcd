"""The HTTP layer every route shares, free of any one protocol.

* `asgi`: raw ASGI helpers (headers, media type, bounded body reading) for the endpoints that skip
  FastAPI's request machinery.
* `params`: request values every protocol reads the same way (the model version).
* `errors`: the one table from domain errors to HTTP answers, and the `ErrorResponse` schema.
* `front`: the ASGI app uvicorn runs: request id, API key check, access log, request metrics and error
  answers, once for every request; the hot routes answered there, everything else by FastAPI.
* `admin`: who may call the admin routes (reload, the V2 repository extension).
* `openapi`: the one way to document a raw route (`Operation`) and to mount it (`add_raw_route`).
"""
