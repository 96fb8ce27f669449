"""kcache: long-context LLM serving with the K cache on the accelerator and the V cache in host memory."""
from kcache.config import EngineConfig, KCacheConfig, SamplingParams
from kcache.engine.llm_engine import LLMEngine, RequestError, RequestOutput
from kcache.llm import LLM, ScoreOutput

__all__ = ["LLM", "LLMEngine", "EngineConfig", "KCacheConfig", "SamplingParams", "RequestOutput", "RequestError", "ScoreOutput"]
__version__ = "0.1.0"
