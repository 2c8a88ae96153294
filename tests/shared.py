"""Where the real TinyStories excerpts lie on machines that have them (../shared/data beside the
checkout); tests that need them skip, or fall back to text of their own, without."""

from pathlib import Path

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
