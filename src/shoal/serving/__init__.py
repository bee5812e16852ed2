"""Serving logic behind the HTTP routes (completions, chat, models, tokenize); no FastAPI here."""
