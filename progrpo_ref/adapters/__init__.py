"""Adapters that give real diffusers models the method's interfaces (``model(x, t, prompts)``, ``Task``)."""
