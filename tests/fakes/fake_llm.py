"""The tests' fake LLM is the demo's stand-in LLM (one implementation for both)."""
from callweaver.simulate.llm_standin import (DEFAULT_REPLY_TEXT, FakeLLM, RecordedRequest, Reply,
                                             split_into_word_tokens)

__all__ = ["DEFAULT_REPLY_TEXT", "FakeLLM", "RecordedRequest", "Reply", "split_into_word_tokens"]
