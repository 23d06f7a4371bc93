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
