"""mars-ray: agent-aware LLM serving on Ray and vLLM (MARS co-scheduling)."""

__version__ = "0.1.0"
