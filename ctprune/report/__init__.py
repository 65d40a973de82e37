"""What a run tells its user: the per-layer inspection table (inspect.py) and the report's rendering (render.py)."""
