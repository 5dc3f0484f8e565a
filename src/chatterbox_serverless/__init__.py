"""chatterbox-serverless: a self-hosted serverless API for Chatterbox TTS.

Data flow, by folder:
  api/      HTTP layer (FastAPI): validates a request, stores a job           request -> job
  jobs/     job store (SQLite | Redis), scheduler forming batches, worker     job -> batch
  engine/   Chatterbox inference written here (T3, S3Gen, voices, pipeline)  batch -> audio
  accounts/ API keys, credits, rate limits (same backends as jobs/)
  client/   Python SDK (sync + async) and the `say` command
"""
__version__ = "0.1.0"
