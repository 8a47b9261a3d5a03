"""HTTP routes only (FastAPI/Starlette). No business logic here."""
