"""HTTP layer (FastAPI): the hosted API's contract over the job store. `create_app` in app.py; `serve` in serve.py."""
