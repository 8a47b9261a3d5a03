"""Wire schemas (pydantic v2). No I/O. Field names exactly as spec §6–§8."""
