"""chatterbox-serverless: a self-hosted serverless API for Chatterbox TTS.

Data flow, by folder (README "Architecture" has the whole map):
  api/        HTTP layer (FastAPI routers): validates a request, stores a job      request -> job
  service.py  builds the service (stores, accounts, engine, worker) from settings.py
  jobs/       job store (SQLite | Redis), batch claims, worker                      job -> batch
  engine/     Chatterbox inference written here (T3, S3Gen, voices, pipeline)       batch -> audio
  media/      reference audio in (SSRF-safe), encoded audio out
  accounts/   API keys, credits, rate limits (same backends as jobs/)
  client/     Python SDK (sync + async) and the `say` command
"""
__version__ = "0.1.0"
