"""One router per surface of the API, each `router(ctx: ApiContext) -> APIRouter` (listed in api/app.py)."""
