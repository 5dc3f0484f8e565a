"""Chatterbox inference, written here: checkpoint loading, voice conditioning, T3, S3Gen, the batched pipeline."""
