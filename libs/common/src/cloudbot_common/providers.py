"""Model providers whose API keys users may store, and the variable each is handed to the
agent as."""

from __future__ import annotations

from enum import StrEnum


class Provider(StrEnum):
    ANTHROPIC = "anthropic"
    OPENAI = "openai"
    GOOGLE = "google"
    MISTRAL = "mistral"
    GROQ = "groq"
    OPENROUTER = "openrouter"
    XAI = "xai"
    DEEPSEEK = "deepseek"


ENV_VAR = {
    Provider.ANTHROPIC: "ANTHROPIC_API_KEY",
    Provider.OPENAI: "OPENAI_API_KEY",
    Provider.GOOGLE: "GEMINI_API_KEY",
    Provider.MISTRAL: "MISTRAL_API_KEY",
    Provider.GROQ: "GROQ_API_KEY",
    Provider.OPENROUTER: "OPENROUTER_API_KEY",
    Provider.XAI: "XAI_API_KEY",
    Provider.DEEPSEEK: "DEEPSEEK_API_KEY",
}

# How each provider is written in messages people read.
DISPLAY_NAME = {
    Provider.ANTHROPIC: "Anthropic",
    Provider.OPENAI: "OpenAI",
    Provider.GOOGLE: "Google",
    Provider.MISTRAL: "Mistral",
    Provider.GROQ: "Groq",
    Provider.OPENROUTER: "OpenRouter",
    Provider.XAI: "xAI",
    Provider.DEEPSEEK: "DeepSeek",
}

# Names said with a vowel sound first ("an xAI key": "ex-A-I").
_AN = {Provider.ANTHROPIC, Provider.OPENAI, Provider.OPENROUTER, Provider.XAI}


def a_key_of(provider: Provider) -> str:
    """'An Anthropic key', 'A Google key': the start of a sentence about a stored key."""
    return f"{'An' if provider in _AN else 'A'} {DISPLAY_NAME[provider]} key"
