"""Calling LLM providers: the OpenAI-compatible client, its transport and its response cache."""
