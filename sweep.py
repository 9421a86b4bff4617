"""flaresweep command line (placeholder until the orchestrator lands)."""
def main() -> None:
    raise SystemExit("sweep.py: the Ray Tune orchestrator is not implemented yet (see README)")
